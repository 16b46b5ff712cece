"""The vCPU threads: KVM_RUN in a loop, exits dispatched on the buses.

One thread per vCPU. KVM_RUN releases the GIL, so vCPUs run guest code in parallel; only
exits to userspace (port I/O, MMIO, system events) take the GIL. The machine stops a vCPU
by setting kvm_run.immediate_exit and sending it SIGUSR1: the flag covers a thread that is
not yet inside KVM_RUN, the signal one that is.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from sandvmm.main import kvm
from sandvmm.main.bus import Bus

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """A handler (doing nothing) so SIGUSR1 interrupts KVM_RUN instead of killing us. Main thread only."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def describe_registers(vcpu: kvm.Vcpu) -> str:
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except kvm.KvmError as error:
        return f"(registers unavailable: {error})"
    names = ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rflags")
    return " ".join(f"{name}={getattr(regs, name):#x}" for name in names) + \
        f" cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x}"


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine stops or the guest does something that ends the VM.

    `on_event(kind, detail)` reports what ended it: "shutdown", "reset", "crash" or "error".
    """

    def __init__(self, index: int, vcpu: kvm.Vcpu, io_bus: Bus, mmio_bus: Bus,
                 on_event: Callable[[str, str], None]):
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.index = index
        self.vcpu = vcpu
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.on_event = on_event
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        self.vcpu.kvm_run.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            signal.pthread_kill(self.ident, KICK_SIGNAL)

    def run(self) -> None:
        try:
            while not self.stopping:
                if not self._handle_exit(self.vcpu.run()):
                    return
        except Exception as error:  # a bug of ours must stop the VM with a message, not hang it
            self.on_event("error", f"vcpu{self.index}: {type(error).__name__}: {error}")

    def _handle_exit(self, reason: int) -> bool:
        """Handle one exit; False when this vCPU is done."""
        run = self.vcpu.kvm_run
        if reason == kvm.KVM_EXIT_IO:
            io = run.io
            port, size, count = io.port, io.size, io.count
            if io.direction == kvm.KVM_EXIT_IO_OUT:
                data = self.vcpu.io_data()
                for i in range(count):
                    self.io_bus.write(port, data[i * size:(i + 1) * size])
            else:
                self.vcpu.set_io_data(b"".join(self.io_bus.read(port, size) for _ in range(count)))
        elif reason == kvm.KVM_EXIT_MMIO:
            mmio = run.mmio
            if mmio.is_write:
                self.mmio_bus.write(mmio.phys_addr, self.vcpu.mmio_data())
            else:
                self.vcpu.set_mmio_data(self.mmio_bus.read(mmio.phys_addr, mmio.len))
        elif reason == kvm.KVM_EXIT_INTR:
            pass  # kicked: the loop condition decides
        elif reason == kvm.KVM_EXIT_SHUTDOWN:
            # A triple fault: Linux's last-resort way to reboot.
            self.on_event("reset", "triple fault")
            return False
        elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            kind = {kvm.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", kvm.KVM_SYSTEM_EVENT_RESET: "reset",
                    kvm.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(run.system_event.type, "error")
            self.on_event(kind, f"system event {run.system_event.type}")
            return False
        elif reason == kvm.KVM_EXIT_HLT:
            self.on_event("shutdown", f"vcpu{self.index} halted")
            return False
        else:
            detail = ""
            if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
                detail = f" suberror {run.internal.suberror}"
            elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
                detail = f" hardware reason {run.fail_entry.hardware_entry_failure_reason:#x}"
            self.on_event("error", f"vcpu{self.index}: KVM exit {kvm.exit_reason_name(reason)}{detail}: "
                          f"{describe_registers(self.vcpu)}")
            return False
        return True
