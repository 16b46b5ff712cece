"""The port-I/O and MMIO buses that vCPU exits are dispatched on.

A device on a bus answers `read(offset, size) -> bytes` and `write(offset, data)`, where
offset is relative to the base it was registered at. Registration happens before any vCPU
thread starts, so dispatch needs no lock; a device shared by several vCPUs guards its own
state. Unclaimed reads return all-ones, as an empty ISA or PCI bus does; unclaimed writes
are dropped.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusOverlap(ValueError):
    pass


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []  # sorted by base

    def register(self, base: int, length: int, device: BusDevice) -> None:
        index = bisect.bisect_left(self._bases, base)
        before = self._ranges[index - 1] if index else None
        after = self._ranges[index] if index < len(self._ranges) else None
        if (before and before[0] + before[1] > base) or (after and base + length > after[0]):
            raise BusOverlap(f"{self.name}: {base:#x}+{length:#x} overlaps a registered device")
        self._bases.insert(index, base)
        self._ranges.insert(index, (base, length, device))

    def find(self, address: int) -> tuple[int, BusDevice] | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            base, length, device = self._ranges[index]
            if address < base + length:
                return base, device
        return None

    def read(self, address: int, size: int) -> bytes:
        found = self.find(address)
        if found is None:
            return b"\xff" * size
        base, device = found
        return device.read(address - base, size)

    def write(self, address: int, data: bytes) -> None:
        found = self.find(address)
        if found is not None:
            base, device = found
            device.write(address - base, data)
