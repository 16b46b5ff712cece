"""The VM's GSI routing table: the irqchip's default pins plus one MSI route per device vector.

KVM has only one routing table per VM and KVM_SET_GSI_ROUTING replaces it whole, so every
change rebuilds it from this object. Device children never touch it: they ask main (over
their irq channel) to point one of *their own* vectors at an MSI message, and main checks
that the message is one a PCI device could send.
"""

from __future__ import annotations

import threading

from sandvmm.main import kvm

FIRST_MSI_GSI = 24  # 0-23 are the IOAPIC's pins
MSI_ADDRESS_BASE, MSI_ADDRESS_MASK = 0xFEE00000, 0xFFF00000  # x86 MSIs write the LAPIC window
MAX_GSI = 4096  # KVM_CAP_IRQ_ROUTING on x86


class RouteError(ValueError):
    pass


class IrqRouting:
    def __init__(self, vm: kvm.Vm):
        self.vm = vm
        self.lock = threading.Lock()
        self.msi: dict[int, tuple[int, int]] = {}  # gsi -> (address, data)
        self.next_gsi = FIRST_MSI_GSI

    def allocate(self, count: int) -> list[int]:
        with self.lock:
            if self.next_gsi + count > MAX_GSI:
                raise RouteError("out of interrupt routes")
            gsis = list(range(self.next_gsi, self.next_gsi + count))
            self.next_gsi += count
            return gsis

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        if (address & MSI_ADDRESS_MASK) != MSI_ADDRESS_BASE or not 0 <= data <= 0xFFFF:
            raise RouteError(f"not an x86 MSI message: address {address:#x} data {data:#x}")
        with self.lock:
            self.msi[gsi] = (address, data)
            routes = kvm.default_irqchip_routes()
            routes += [kvm.msi_route(g, a, d) for g, (a, d) in sorted(self.msi.items())]
            self.vm.set_gsi_routing(routes)
