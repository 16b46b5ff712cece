"""The machine: KVM VM, guest RAM, in-kernel irqchip, legacy devices, vCPUs, and how it ends.

Everything here runs in the main process. Build order matters: the irqchip must exist
before vCPUs are created, and CPUID must be set before a vCPU first runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandvmm.guest.protocol import READY_PORT, STATUS_PORT
from sandvmm.main import acpi, kvm
from sandvmm.main.boot import ACPI_ADDRESS, Kernel, load_linux
from sandvmm.main.bus import Bus
from sandvmm.main.cpu import boot_msrs, enter_long_mode, vcpu_cpuid
from sandvmm.main.legacy.i8042 import I8042
from sandvmm.main.legacy.pm import PowerManagement
from sandvmm.main.legacy.rtc import Rtc
from sandvmm.main.legacy.serial import Serial
from sandvmm.memory import ECAM_BASE, PCI_WINDOW32, GuestMemory, MiB, pci_window64
from sandvmm.main.device_proxy import DeviceProxy
from sandvmm.main.devices import DeviceHost, DeviceSpec, SandboxOptions, host_cpus
from sandvmm.main.interrupts import IrqRouting
from sandvmm.main.pci import Ecam, PciRoot
from sandvmm.main.vcpu import VcpuThread

TSS_ADDRESS = 0xFFFBD000
IDENTITY_MAP_ADDRESS = 0xFFFBC000
COM1_PORT, COM1_IRQ = 0x3F8, 4
PM_PORT = 0x600
PVPANIC_PORT = 0x505
PVPANIC_PANICKED, PVPANIC_CRASH_LOADED = 1, 2


@dataclass
class MachineConfig:
    kernel: Kernel
    initrd: Path | None
    cmdline: str
    mem_mib: int = 512
    cpus: int = 1
    devices: list[DeviceSpec] = field(default_factory=list)
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)


def intx_gsi(slot: int) -> int:
    """The IOAPIC pin of a slot's INTA (the DSDT's _PRT says the same): 16-23, round robin."""
    return 16 + (slot - 1) % 8


@dataclass
class Outcome:
    """How the VM ended. kind: exit (status reported by init), poweroff, reset, panic, error, signal."""
    kind: str
    status: int = 0
    detail: str = ""


class PortCallback:
    """A write-only I/O port that hands each byte it receives to a callback."""

    def __init__(self, on_write: Callable[[int], None], read_value: int = 0xFF):
        self.on_write = on_write
        self.read_value = read_value

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.read_value]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.on_write(data[0])


class Machine:
    def __init__(self, config: MachineConfig, console_output: Callable[[bytes], None],
                 on_ready: Callable[[], None] = lambda: None, kvm_device: str = "/dev/kvm"):
        self.config = config
        self._outcome: Outcome | None = None
        self._ended = threading.Event()
        self.on_end: Callable[[], None] = lambda: None  # also told when the VM ends (from any thread)
        self._lock = threading.Lock()
        self.kvm = kvm.Kvm(kvm_device)
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDRESS)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
        self.memory = GuestMemory(config.mem_mib * MiB)
        base = kvm.mmap_address(self.memory.mapping)
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.guest_address, region.size, base + region.file_offset)
        self.vm.create_irqchip()
        self.vm.create_pit()

        self.io_bus, self.mmio_bus = Bus("io"), Bus("mmio")
        self.serial = Serial(console_output, lambda: self._pulse_irq(COM1_IRQ))
        self.io_bus.register(COM1_PORT, 8, self.serial)
        window64 = pci_window64(self.memory.size)
        self.pci = PciRoot(PCI_WINDOW32, window64)
        self.mmio_bus.register(ECAM_BASE, Ecam.SIZE, self.pci.ecam)
        for base, size in (PCI_WINDOW32, window64):
            self.mmio_bus.register(base, size, self.pci.bar_window(base))
        i8042 = I8042(on_reset=lambda: self.end(Outcome("reset", detail="i8042 reset")))
        self.io_bus.register(0x60, 1, i8042.data_port)
        self.io_bus.register(0x64, 1, i8042.command_port)
        rtc = Rtc()
        self.io_bus.register(0x70, 2, rtc)
        self.io_bus.register(PM_PORT, 16, PowerManagement(
            on_power_off=lambda: self.end(Outcome("poweroff")),
            on_reset=lambda: self.end(Outcome("reset", detail="ACPI reset"))))
        self.io_bus.register(STATUS_PORT, 1, PortCallback(lambda value: self.end(Outcome("exit", value))))
        self.io_bus.register(READY_PORT, 1, PortCallback(lambda value: on_ready()))
        self.io_bus.register(PVPANIC_PORT, 1, PortCallback(self._pvpanic, PVPANIC_PANICKED | PVPANIC_CRASH_LOADED))

        # Devices fork now, while main has no threads; a failed start kills those already up.
        self.devices = DeviceHost(config.sandbox, lambda reason: self.end(Outcome("device", 1, reason)))
        try:
            self._launch_devices()
        except BaseException:
            self.devices.stop()
            raise

        dsdt = acpi.pvpanic_device(PVPANIC_PORT) + acpi.pci_host_bridge(
            PCI_WINDOW32, window64, {slot: intx_gsi(slot) for slot in range(1, 32)})
        tables, rsdp = acpi.build_tables(acpi.AcpiConfig(cpus=config.cpus, pm_base=PM_PORT,
                                                         ecam=(ECAM_BASE, 0, 0), dsdt_extra=dsdt), ACPI_ADDRESS)
        self.memory.write(ACPI_ADDRESS, tables)
        entry = load_linux(self.memory, config.kernel, config.cmdline, config.initrd, rsdp)

        supported = self.kvm.supported_cpuid()
        self.vcpus: list[VcpuThread] = []
        for index in range(config.cpus):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid(vcpu_cpuid(supported, index, config.cpus))
            vcpu.set_msrs(boot_msrs())
            if index == 0:
                enter_long_mode(vcpu, entry)  # the others wait for the guest's INIT/SIPI
            self.vcpus.append(VcpuThread(index, vcpu, self.io_bus, self.mmio_bus, self._vcpu_event))

    def _launch_devices(self) -> None:
        routing = IrqRouting(self.vm)
        for slot, spec in enumerate(self.config.devices, start=1):
            proxy = self.devices.launch(spec, self.memory, lambda channels: DeviceProxy(
                spec.name, self.vm, routing, channels, intx_gsi(slot)))
            self.pci.add(proxy, slot)

    def _pulse_irq(self, irq: int) -> None:
        # ISA interrupts are edge-triggered: a rising edge is one interrupt.
        self.vm.irq_line(irq, True)
        self.vm.irq_line(irq, False)

    def _pvpanic(self, value: int) -> None:
        if value & PVPANIC_PANICKED:
            self.end(Outcome("panic", detail="the guest kernel panicked"))

    def _vcpu_event(self, kind: str, detail: str) -> None:
        self.end(Outcome({"shutdown": "poweroff", "crash": "panic"}.get(kind, kind), detail=detail))

    def end(self, outcome: Outcome) -> None:
        """Record how the VM ended (the first report wins), halt the vCPUs and wake whoever waits.

        Halting here, and not when main wakes up, keeps the guest from running on past its
        end: after init reports its status it powers off, and the kernel's "Power down"
        line would reach the console behind the command's output.
        """
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        for thread in getattr(self, "vcpus", ()):
            thread.stop()
        self._ended.set()
        self.on_end()

    def start(self) -> None:
        self.devices.start()
        if host_cpus() < 2:
            # One CPU: children starting beside the guest would only take turns with it, and
            # each switch costs (a lab boot took 0.4 s longer): let them finish first.
            self.devices.wait_started()
        for thread in self.vcpus:
            thread.start()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        self._ended.wait(timeout)
        return self._outcome

    def stop(self) -> None:
        for thread in self.vcpus:
            thread.stop()
        for thread in self.vcpus:
            if thread.is_alive():
                thread.join(timeout=2)
                if thread.is_alive():  # still inside a long exit handler: kick again
                    thread.stop()
                    thread.join(timeout=2)
        self.devices.stop()
