"""How fast does this /dev/kvm run guest code?

Boots a tiny guest directly in 64-bit long mode (no firmware, no real-mode
code: paging, GDT and EFER are set up through KVM_SET_SREGS) that counts a
register down from N in a ``dec rcx / jnz`` loop, reports completion with an
OUT, then halts. Only the KVM_RUN loop is timed, so the rate reflects guest
execution speed (~2 instructions per iteration), not VM setup cost.

    python -m sandvmm.main.probe [--iterations N] [--json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import struct
import sys
import time
from dataclasses import asdict, dataclass

from sandvmm.main import kvm

# Guest-physical layout (everything inside one small RAM slot at 0).
MEM_SIZE = 0x10000
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
GDT_ADDR = 0x4000
CODE_ADDR = 0x5000
STACK_TOP = 0x8000
# Outside RAM; only consulted by Intel VMX (harmless elsewhere).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

DONE_PORT = 0xE9
DONE_MAGIC = 0x600DF00D

PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

CODE_SEL, DATA_SEL = 0x08, 0x10


class ProbeError(RuntimeError):
    """The guest did not run to completion as expected."""


@dataclass(frozen=True)
class ProbeResult:
    iterations: int
    seconds: float  # wall time spent in the KVM_RUN loop only
    rate: float     # loop iterations per second


def guest_code(iterations: int) -> bytes:
    """Hand-assembled, legacy-encoded (no VEX) x86-64 guest program."""
    return b"".join([
        b"\x48\xB9" + struct.pack("<Q", iterations),  # mov rcx, imm64
        b"\x48\xFF\xC9",                              # loop: dec rcx
        b"\x75\xFB",                                  #       jnz loop
        b"\x66\xBA" + struct.pack("<H", DONE_PORT),   # mov dx, DONE_PORT
        b"\xB8" + struct.pack("<I", DONE_MAGIC),      # mov eax, DONE_MAGIC
        b"\xEF",                                      # out dx, eax
        b"\xF4",                                      # hlt
        b"\xEB\xFD",                                  # jmp hlt (never re-entered)
    ])


def _build_memory(mem: mmap.mmap, iterations: int) -> None:
    # Identity-map the first 2 MiB with one large page: PML4 -> PDPT -> PD(PS).
    struct.pack_into("<Q", mem, PML4_ADDR, PDPT_ADDR | PTE_P | PTE_RW)
    struct.pack_into("<Q", mem, PDPT_ADDR, PD_ADDR | PTE_P | PTE_RW)
    struct.pack_into("<Q", mem, PD_ADDR, 0 | PTE_P | PTE_RW | PTE_PS)
    # GDT: null, 64-bit code (L=1, DPL0), flat data.
    struct.pack_into("<3Q", mem, GDT_ADDR, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    code = guest_code(iterations)
    mem[CODE_ADDR:CODE_ADDR + len(code)] = code


def _enter_long_mode(vcpu: kvm.Vcpu) -> None:
    # Start from the reset state so TR/LDT keep KVM's valid defaults.
    sregs = vcpu.get_sregs()
    code = kvm.KvmSegment(base=0, limit=0xFFFFFFFF, selector=CODE_SEL, type=0xB,
                          present=1, dpl=0, db=0, s=1, l=1, g=1)
    data = kvm.KvmSegment(base=0, limit=0xFFFFFFFF, selector=DATA_SEL, type=0x3,
                          present=1, dpl=0, db=1, s=1, l=0, g=1)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 3 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm.KvmRegs(rip=CODE_ADDR, rsp=STACK_TOP, rflags=0x2))


def measure(iterations: int, *, device: str = "/dev/kvm") -> ProbeResult:
    """Run the countdown guest for ``iterations`` loop turns and time it."""
    if not 1 <= iterations < 2**63:
        raise ValueError(f"iterations must be in [1, 2**63), got {iterations}")
    with kvm.Kvm(device) as dev, dev.create_vm() as vm:
        if vm.check_extension(kvm.KVM_CAP_SET_TSS_ADDR):
            vm.set_tss_addr(TSS_ADDR)
        if vm.check_extension(kvm.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            _build_memory(mem, iterations)
            vm.set_user_memory_region(0, 0, MEM_SIZE, kvm.mmap_address(mem))
            with vm.create_vcpu(0) as vcpu:
                _enter_long_mode(vcpu)
                seconds, reported = _run_to_halt(vcpu)
                regs = vcpu.get_regs()
        finally:
            mem.close()
    if not reported:
        raise ProbeError("guest halted without reporting completion on port "
                         f"{DONE_PORT:#x}")
    if regs.rcx != 0:
        raise ProbeError(f"guest halted with rcx={regs.rcx}, expected 0")
    return ProbeResult(iterations, seconds, iterations / seconds if seconds > 0 else float("inf"))


def _run_to_halt(vcpu: kvm.Vcpu) -> tuple[float, bool]:
    """KVM_RUN until HLT; return (elapsed seconds, saw the completion OUT)."""
    run = vcpu.kvm_run
    reported = False
    start = time.perf_counter()
    while True:
        reason = vcpu.run()
        if reason == kvm.KVM_EXIT_HLT:
            return time.perf_counter() - start, reported
        if reason == kvm.KVM_EXIT_IO:
            io = run.io
            if (io.direction == kvm.KVM_EXIT_IO_OUT and io.port == DONE_PORT
                    and io.size == 4 and io.count == 1):
                reported = vcpu.io_data() == struct.pack("<I", DONE_MAGIC)
            continue
        if reason == kvm.KVM_EXIT_INTR:
            continue
        rip = vcpu.get_regs().rip
        detail = ""
        if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {run.internal.suberror})"
        elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
            detail = f" (hardware reason {run.fail_entry.hardware_entry_failure_reason:#x})"
        elif reason == kvm.KVM_EXIT_MMIO:
            detail = f" (address {run.mmio.phys_addr:#x})"
        raise ProbeError(f"unexpected exit {kvm.exit_reason_name(reason)}{detail} "
                         f"at rip={rip:#x}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandvmm.main.probe",
                                     description="Measure how fast /dev/kvm runs a guest loop.")
    parser.add_argument("--iterations", type=int, default=200_000,
                        help="guest loop iterations (2 instructions each; default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        result = measure(args.iterations, device=args.device)
    except (kvm.KvmError, ProbeError, ValueError, OSError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{result.iterations} iterations in {result.seconds:.6f} s: "
              f"{result.rate:,.0f} iterations/s (~{2 * result.rate:,.0f} instructions/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
