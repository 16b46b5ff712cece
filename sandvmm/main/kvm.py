"""Minimal ctypes binding of the Linux KVM API (x86-64 only).

Object model mirrors the kernel's three file descriptors:
``Kvm`` (/dev/kvm, system ioctls) -> ``Vm`` (VM fd) -> ``Vcpu`` (vCPU fd plus
its shared ``kvm_run`` page). Ioctls call libc's ioctl(2) through ctypes,
which drops the GIL around the call, so a thread sitting in ``Vcpu.run`` does
not stall the rest of the process.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmError(Exception):
    """A KVM ioctl (or the device itself) failed; ``errno`` is kept when known."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used at all on this host."""


# --- ioctl request encoding (include/uapi/asm-generic/ioctl.h) ---------------
# Layout: dir(2 bits) | size(14) | type(8) | nr(8).
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOW(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


# --- uapi structures (arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h)
class KvmRegs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
    ).split()]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = ([(n, KvmSegment) for n in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * 4)])


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]  # data lives in the kvm_run page at this offset


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _KvmRunExitUnion(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("mmio", KvmRunMmio), ("fail_entry", KvmRunFailEntry),
                ("internal", KvmRunInternal), ("system_event", KvmRunSystemEvent),
                ("padding", u8 * 256)]


class KvmRun(ctypes.Structure):
    """Head of ``struct kvm_run``: fixed header plus the per-exit union."""
    _anonymous_ = ("exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _KvmRunExitUnion)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", ctypes.c_uint8 * 16)]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", ctypes.c_uint8 * 36)]


class KvmIrqRoutingEntry(ctypes.Structure):
    # The union is irqchip {irqchip, pin} or msi {address_lo, address_hi, data, pad}; eight
    # u32s cover its largest member.
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", u32 * 8)]


def _counted(entry_type, count: int, count_field: str = "nent"):
    """A kvm_cpuid2/kvm_msrs-style struct: a u32 count, padding, then `count` entries."""
    class Counted(ctypes.Structure):
        _fields_ = [(count_field, u32), ("padding", u32), ("entries", entry_type * count)]
    return Counted


# A wrong layout would corrupt memory silently; fail loudly at import instead.
assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32 and KvmRun.exit.offset == 32
assert ctypes.sizeof(KvmCpuidEntry2) == 40 and ctypes.sizeof(KvmPitConfig) == 64
assert ctypes.sizeof(KvmIrqfd) == 32 and ctypes.sizeof(KvmIoeventfd) == 64
assert ctypes.sizeof(KvmIrqRoutingEntry) == 48

# --- ioctls ------------------------------------------------------------------
KVMIO = 0xAE
KVM_API_VERSION = 12

KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOC(3, KVMIO, 0x05, 8)  # sizes count the header only
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, KvmIrqLevel)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, KvmPitConfig)
KVM_SET_GSI_ROUTING = _IOC(1, KVMIO, 0x6A, 8)
KVM_IRQFD = _IOW(KVMIO, 0x76, KvmIrqfd)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, KvmIoeventfd)
KVM_SET_MSRS = _IOC(1, KVMIO, 0x89, 8)
KVM_SET_CPUID2 = _IOC(1, KVMIO, 0x90, 8)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, KvmSregs)

# For error messages: request number -> "KVM_..." name.
_IOCTL_NAMES = {v: k for k, v in globals().items()
                if k.startswith("KVM_") and k != "KVM_API_VERSION"}

# Capabilities (KVM_CHECK_EXTENSION arguments).
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IRQCHIP = 0
KVM_CAP_PIT2 = 33
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD_RESAMPLE = 82

KVM_IRQFD_FLAG_DEASSIGN, KVM_IRQFD_FLAG_RESAMPLE = 1, 2
KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_PIO, KVM_IOEVENTFD_FLAG_DEASSIGN = 1, 2, 4
KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI = 1, 2
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

# Exit reasons (kvm_run.exit_reason).
KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_IO, KVM_EXIT_HYPERCALL = 0, 1, 2, 3
KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_IRQ_WINDOW_OPEN = 4, 5, 6, 7
KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR = 8, 9, 10
KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT = 17, 24

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

_EXIT_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in globals().items()
               if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")}


def exit_reason_name(reason: int) -> str:
    """'HLT', 'IO', ... or 'UNKNOWN(<n>)' for reasons this module does not name."""
    return _EXIT_NAMES.get(reason, f"UNKNOWN({reason})")


_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg=0) -> int:
    """ioctl(2); failures raise KvmError naming the ioctl, with errno.

    Not fcntl.ioctl: it takes integer arguments as a C int, so values above
    2 GiB (e.g. the TSS address 0xfffbd000) overflow. Integers go as unsigned
    long here, ctypes objects by reference (in place, no copy).
    """
    carg = ctypes.c_ulong(arg) if isinstance(arg, int) else ctypes.byref(arg)
    ret = _libc_ioctl(fd, ctypes.c_ulong(request), carg)
    if ret < 0:
        err = ctypes.get_errno()
        name = _IOCTL_NAMES.get(request, hex(request))
        raise KvmError(f"{name} failed: {os.strerror(err)}", err)
    return ret


def mmap_address(buf) -> int:
    """Host address of a writable buffer such as an mmap (for memory regions).

    The temporary ctypes view dies at once, so the mmap stays closable; the
    caller must keep the mapping alive as long as a VM uses it.
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class _Fd:
    """Owns one file descriptor; closable and usable as a context manager."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Kvm(_Fd):
    """The /dev/kvm system handle."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}", e.errno) from None
        try:
            version = _ioctl(self.fd, KVM_GET_API_VERSION)
        except KvmError as e:
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device: {e}", e.errno) from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path}: KVM API version {version}, need {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        """0 if unsupported, otherwise a positive (cap-specific) value."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, machine_type: int = 0) -> Vm:
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, machine_type))

    def supported_cpuid(self) -> list[KvmCpuidEntry2]:
        """Every CPUID leaf KVM can offer a guest on this host."""
        for count in (128, 256, 512):
            table = _counted(KvmCpuidEntry2, count)(nent=count)
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, table)
            except KvmError as e:
                if e.errno == _errno.E2BIG:
                    continue
                raise
            return list(table.entries[:table.nent])
        raise KvmError("KVM_GET_SUPPORTED_CPUID: too many entries")


class Vm(_Fd):
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm, self.fd = kvm, fd

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """Map host memory at ``userspace_addr`` into guest physical space.

        ``size == 0`` deletes the slot. Any page-aligned host mapping works
        (anonymous mmap, memfd, ...); see ``mmap_address``.
        """
        region = KvmUserspaceMemoryRegion(slot, flags, guest_phys_addr, size, userspace_addr)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        """Intel VMX needs 3 pages of guest-physical space for real-mode emulation."""
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """Intel VMX: one page for the EPT identity map used in unpaged mode."""
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        return Vcpu(self, _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id))

    def create_irqchip(self) -> None:
        """The in-kernel PIC, IOAPIC and per-vCPU local APICs."""
        _ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, KvmPitConfig())

    def irq_line(self, irq: int, level: bool) -> None:
        _ioctl(self.fd, KVM_IRQ_LINE, KvmIrqLevel(irq, int(level)))

    def set_gsi_routing(self, routes: list[KvmIrqRoutingEntry]) -> None:
        """Replace the whole GSI routing table (KVM keeps no other)."""
        table = _counted(KvmIrqRoutingEntry, len(routes), "nr")(nr=len(routes))
        for index, route in enumerate(routes):
            table.entries[index] = route
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, table)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        """Writing 1 to eventfd `fd` raises `gsi`; with `resample_fd` the line is level-triggered
        and KVM signals resample_fd when the guest EOIs it (so the device can re-assert)."""
        flags = (KVM_IRQFD_FLAG_DEASSIGN if deassign else 0) | (KVM_IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0)
        _ioctl(self.fd, KVM_IRQFD, KvmIrqfd(fd, gsi, flags, resample_fd or 0))

    def ioeventfd(self, fd: int, address: int, length: int, pio: bool = False, deassign: bool = False) -> None:
        """A guest write of `length` bytes at `address` signals eventfd `fd` inside KVM, with
        no exit to us."""
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, KVM_IOEVENTFD, KvmIoeventfd(0, address, length, fd, flags))


def irqchip_route(gsi: int, chip: int, pin: int) -> KvmIrqRoutingEntry:
    route = KvmIrqRoutingEntry(gsi=gsi, type=KVM_IRQ_ROUTING_IRQCHIP)
    route.u[0], route.u[1] = chip, pin
    return route


def msi_route(gsi: int, address: int, data: int) -> KvmIrqRoutingEntry:
    route = KvmIrqRoutingEntry(gsi=gsi, type=KVM_IRQ_ROUTING_MSI)
    route.u[0], route.u[1], route.u[2] = address & 0xFFFFFFFF, address >> 32, data
    return route


def default_irqchip_routes() -> list[KvmIrqRoutingEntry]:
    """KVM's own routing after KVM_CREATE_IRQCHIP: GSIs 0-15 reach both PICs and the IOAPIC,
    16-23 the IOAPIC only. KVM_SET_GSI_ROUTING replaces the table, so ours starts from these."""
    routes = []
    for gsi in range(24):
        if gsi < 16:
            chip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            routes.append(irqchip_route(gsi, chip, gsi % 8))
        routes.append(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi))
    return routes


class Vcpu(_Fd):
    _run_map: mmap.mmap | None = None

    def __init__(self, vm: Vm, fd: int) -> None:
        self.vm, self.fd = vm, fd
        try:
            # kvm_run is shared with the kernel: exit details appear here after KVM_RUN.
            self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, KvmError) as e:
            self.close()
            raise KvmError(f"cannot map kvm_run: {e}", getattr(e, "errno", None)) from None
        self.kvm_run = KvmRun.from_buffer(self._run_map)

    def close(self) -> None:
        if self._run_map is not None:
            self.kvm_run = None  # drop our buffer export before unmapping
            try:
                self._run_map.close()
            except BufferError:
                pass  # a caller still holds a KvmRun view; unmapped when it dies
            self._run_map = None
        super().close()

    def run(self) -> int:
        """Enter the guest until the next userspace exit; return the exit reason.

        A signal interrupting KVM_RUN is reported as KVM_EXIT_INTR, not raised; so is
        EAGAIN, which an application processor gets while it waits for its startup IPI.
        """
        try:
            _ioctl(self.fd, KVM_RUN)
        except KvmError as e:
            if e.errno not in (_errno.EINTR, _errno.EAGAIN):
                raise
            return KVM_EXIT_INTR
        return self.kvm_run.exit_reason

    def io_data(self) -> bytes:
        """Payload of the current KVM_EXIT_IO (size * count bytes)."""
        io = self.kvm_run.io
        return self._run_map[io.data_offset:io.data_offset + io.size * io.count]

    def set_io_data(self, data: bytes) -> None:
        """Supply the value for an IN exit; KVM picks it up on the next run()."""
        off = self.kvm_run.io.data_offset
        self._run_map[off:off + len(data)] = data

    def set_cpuid(self, entries: list[KvmCpuidEntry2]) -> None:
        table = _counted(KvmCpuidEntry2, len(entries))(nent=len(entries))
        table.entries[:] = entries
        _ioctl(self.fd, KVM_SET_CPUID2, table)

    def set_msrs(self, values: dict[int, int]) -> None:
        table = _counted(KvmMsrEntry, len(values), "nmsrs")(nmsrs=len(values))
        table.entries[:] = [KvmMsrEntry(index, 0, data) for index, data in values.items()]
        written = _ioctl(self.fd, KVM_SET_MSRS, table)
        if written != len(values):
            bad = list(values)[written]
            raise KvmError(f"KVM_SET_MSRS refused MSR {bad:#x}")

    def mmio_data(self) -> bytes:
        mmio = self.kvm_run.mmio
        return bytes(mmio.data[:mmio.len])

    def set_mmio_data(self, data: bytes) -> None:
        self.kvm_run.mmio.data[:len(data)] = data

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs)
