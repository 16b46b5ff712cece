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
import struct
import sys
import time
from dataclasses import asdict, dataclass

from sandvmm.main import kvm
from sandvmm.main.boot import write_gdt, write_page_tables
from sandvmm.main.cpu import enter_long_mode
from sandvmm.memory import GuestMemory, MiB

# One small RAM slot at 0: boot.py's page tables and GDT below 64 KiB, the code at 1 MiB.
MEM_SIZE = 2 * MiB
CODE_ADDR = 1 * MiB
# Outside RAM; only consulted by Intel VMX (harmless elsewhere).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

DONE_PORT = 0xE9
DONE_MAGIC = 0x600DF00D



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


def _build_memory(memory: GuestMemory, iterations: int) -> None:
    # The same identity map and GDT the Linux boot path uses, so the probe tests them too.
    write_page_tables(memory)
    write_gdt(memory)
    memory.write(CODE_ADDR, guest_code(iterations))


def measure(iterations: int, *, device: str = "/dev/kvm") -> ProbeResult:
    """Run the countdown guest for ``iterations`` loop turns and time it."""
    if not 1 <= iterations < 2**63:
        raise ValueError(f"iterations must be in [1, 2**63), got {iterations}")
    with kvm.Kvm(device) as dev, dev.create_vm() as vm:
        if vm.check_extension(kvm.KVM_CAP_SET_TSS_ADDR):
            vm.set_tss_addr(TSS_ADDR)
        if vm.check_extension(kvm.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        memory = GuestMemory(MEM_SIZE, "sandvmm-probe")
        try:
            _build_memory(memory, iterations)
            vm.set_user_memory_region(0, 0, MEM_SIZE, kvm.mmap_address(memory.mapping))
            with vm.create_vcpu(0) as vcpu:
                enter_long_mode(vcpu, CODE_ADDR)
                seconds, reported = _run_to_halt(vcpu)
                regs = vcpu.get_regs()
        finally:
            memory.close()
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
