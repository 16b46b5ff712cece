"""Per-vCPU state at power-on: CPUID with a consistent topology, MSRs, and 64-bit registers.

Topology: N vCPUs are N cores of one socket, one thread each; vCPU i has APIC ID i. The
same picture has to appear in every leaf Linux may consult (1, 4 and 0xB on both vendors,
0x80000008 and 0x8000001E on AMD), or the kernel disagrees with itself about CPU numbering.
"""

from __future__ import annotations

import copy

from sandvmm.main import kvm
from sandvmm.main.boot import BOOT_CS, BOOT_DS, BOOT_PARAMS_ADDRESS, GDT_ADDRESS, PML4_ADDRESS

CPUID_HYPERVISOR = 1 << 31  # leaf 1 ECX: tells the guest it is virtualized
CPUID_TSC_DEADLINE = 1 << 24
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_IA32_TSC = 0x10
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE, MTRR_TYPE_WRITEBACK = 1 << 11, 6

CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


def _bits_for(count: int) -> int:
    """How many APIC ID bits address `count` things."""
    return max(count - 1, 0).bit_length()


def vcpu_cpuid(supported: list[kvm.KvmCpuidEntry2], vcpu: int, cpus: int) -> list[kvm.KvmCpuidEntry2]:
    core_bits = _bits_for(cpus)
    entries = []
    for original in supported:
        entry = copy.copy(original)
        leaf, index = entry.function, entry.index
        if leaf == 1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (vcpu << 24) | (min(cpus, 255) << 16)
            entry.ecx |= CPUID_HYPERVISOR
            entry.edx |= 1 << 28  # HTT: ebx[23:16] is valid
        elif leaf == 4 and entry.eax & 0x1F:  # a cache exists at this index
            # cores per package - 1 in [31:26]; sharing: L1/L2 per core, L3 by all cores.
            sharing = cpus - 1 if (entry.eax >> 5) & 7 == 3 else 0
            entry.eax = (entry.eax & 0x3FFF) | (sharing << 14) | ((cpus - 1) << 26)
        elif leaf in (0xB, 0x1F):
            level = {0: (0, 1, 1), 1: (core_bits, cpus, 2)}.get(index)
            entry.eax, entry.ebx, entry.ecx = (level[0], level[1], (level[2] << 8) | index) if level else (0, 0, index)
            entry.edx = vcpu
        elif leaf == 0x80000001:
            entry.ecx &= ~(1 << 1)  # CmpLegacy would say "no HTT but multi-core" in the old way
        elif leaf == 0x80000008:
            entry.ecx = (entry.ecx & ~0xF0FF) | (core_bits << 12) | (cpus - 1)
        elif leaf == 0x8000001E:
            entry.eax, entry.ebx, entry.ecx = vcpu, vcpu & 0xFF, 0
        entries.append(entry)
    return entries


def boot_msrs() -> dict[int, int]:
    return {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        # Firmware would enable MTRRs with write-back as the default; without it Linux
        # treats all RAM as uncached.
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK,
    }


def _segment(selector: int, code: bool) -> kvm.KvmSegment:
    return kvm.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=0xB if code else 0x3,
                          present=1, dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def enter_long_mode(vcpu: kvm.Vcpu, entry_point: int) -> None:
    """The register state the 64-bit boot protocol requires at startup_64."""
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(BOOT_CS, code=True)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _segment(BOOT_DS, code=False)
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDRESS, 4 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = kvm.KvmRegs()
    regs.rip, regs.rsi, regs.rflags = entry_point, BOOT_PARAMS_ADDRESS, 0x2
    vcpu.set_regs(regs)
