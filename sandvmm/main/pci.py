"""The PCI root: bus 0, its configuration space (ECAM only), and the BARs.

Configuration space is reached only through ECAM, which the MCFG table advertises, as on
QEMU's microvm: with ports 0xCF8/0xCFC present Linux prefers them for the first 256 bytes,
and each access is then two port exits (address, data) instead of one MMIO exit; a boot's
PCI scan made about 900 of them.

Main owns the bus: it numbers the slots, answers for empty ones, and owns every BAR register
so that it alone decides where a device's registers appear in guest-physical space. The rest
of a function's configuration space belongs to the function (for a virtio device, to its
jailed child, reached through a proxy).

BAR accesses arrive on the MMIO bus through two fixed windows that the DSDT's host bridge
advertises (below 4 GiB for 32-bit BARs, above RAM for 64-bit ones); the root looks up which
BAR a guest address falls in. The buses stay static while BARs move, and a BAR is decoded
only while its function's command register enables memory space, as on real hardware.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Protocol

CLASS_HOST_BRIDGE = 0x060000
# Red Hat's generic host-bridge ID: a bridge no guest driver claims or quirks.
VENDOR_REDHAT, DEVICE_HOST_BRIDGE = 0x1B36, 0x0008
SLOTS = 32
COMMAND, COMMAND_MEMORY = 0x04, 1 << 1
BAR_REGISTERS = range(0x10, 0x28)
EXPANSION_ROM = 0x30
BAR_MEMORY_64 = 0x4  # type bits of a memory BAR (bit 0 clear = memory space)
BAR_PREFETCHABLE = 0x8


@dataclass(frozen=True)
class BarSpec:
    index: int
    size: int  # a power of two, at least 4 KiB (page-sized, so ioeventfds never share a page)
    is_64bit: bool = True
    prefetchable: bool = False


class PciFunction(Protocol):
    """A device function on bus 0. Register offsets are within its 4 KiB configuration space."""

    bars: list[BarSpec]

    def config_read(self, register: int, size: int) -> bytes: ...

    def config_write(self, register: int, data: bytes) -> None: ...

    def bar_read(self, index: int, offset: int, size: int) -> bytes: ...

    def bar_write(self, index: int, offset: int, data: bytes) -> None: ...

    def bar_mapped(self, index: int, base: int | None) -> None:
        """The BAR now decodes at base (None: not decoded). Called with the root's lock held."""


class ConfigSpace:
    """256 bytes of type-0 configuration header; reads anywhere, writes only where writable."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0):
        self.data = bytearray(256)
        struct.pack_into("<HH", self.data, 0x00, vendor, device)
        struct.pack_into("<I", self.data, 0x08, (class_code << 8) | revision)
        self.writable = bytearray(256)
        self.writable[0x04:0x06] = b"\x07\x05"  # command: I/O, memory, bus master, SERR, INTx disable

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size]).ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            if offset + index < 256:
                mask = self.writable[offset + index]
                self.data[offset + index] = (self.data[offset + index] & ~mask) | (byte & mask)


class HostBridge:
    bars: list[BarSpec] = []

    def __init__(self):
        self.space = ConfigSpace(VENDOR_REDHAT, DEVICE_HOST_BRIDGE, CLASS_HOST_BRIDGE)

    def config_read(self, register: int, size: int) -> bytes:
        return self.space.read(register, size)

    def config_write(self, register: int, data: bytes) -> None:
        self.space.write(register, data)


class BarWindow:
    """A range of guest-physical space from which BARs are handed out, bottom up."""

    def __init__(self, base: int, size: int):
        self.base, self.end, self.cursor = base, base + size, base

    def allocate(self, size: int) -> int:
        address = -(-self.cursor // size) * size  # natural alignment, as BAR sizing requires
        if address + size > self.end:
            raise ValueError(f"PCI window {self.base:#x}-{self.end:#x} is full")
        self.cursor = address + size
        return address


class _Slot:
    """Main's view of one function: its BAR registers and whether memory decoding is on."""

    def __init__(self, function: PciFunction, windows: tuple[BarWindow, BarWindow]):
        self.function = function
        self.specs = {spec.index: spec for spec in function.bars}
        self.registers = bytearray(0x18)  # 0x10..0x27, what the guest reads back
        self.memory_enabled = False
        for spec in function.bars:
            window = windows[1] if spec.is_64bit else windows[0]
            self._set_address(spec, window.allocate(spec.size))

    def _set_address(self, spec: BarSpec, address: int) -> None:
        flags = (BAR_MEMORY_64 if spec.is_64bit else 0) | (BAR_PREFETCHABLE if spec.prefetchable else 0)
        value = (address & ~(spec.size - 1)) | flags
        width = 8 if spec.is_64bit else 4
        self.registers[spec.index * 4:spec.index * 4 + width] = value.to_bytes(8, "little")[:width]

    def address(self, spec: BarSpec) -> int:
        width = 8 if spec.is_64bit else 4
        raw = int.from_bytes(self.registers[spec.index * 4:spec.index * 4 + width], "little")
        return raw & ~0xF

    def write_bars(self, register: int, data: bytes) -> None:
        offset = register - BAR_REGISTERS.start
        self.registers[offset:offset + len(data)] = data[:len(self.registers) - offset]
        # Sizing: the guest writes all-ones and reads back the size mask; keeping the address
        # bits masked to the size and the type bits fixed makes that work for free.
        for spec in self.specs.values():
            self._set_address(spec, self.address(spec))

    def mapping(self) -> dict[int, int | None]:
        return {index: self.address(spec) if self.memory_enabled else None
                for index, spec in self.specs.items()}


class PciRoot:
    """Bus 0. `ecam` and the BAR windows go on the MMIO bus."""

    def __init__(self, window32: tuple[int, int] = (0, 0), window64: tuple[int, int] = (0, 0)):
        self.lock = threading.RLock()
        self.windows = (BarWindow(*window32), BarWindow(*window64))
        self.slots: dict[int, _Slot] = {}
        self.mapped: list[tuple[int, int, _Slot, int]] = []  # (base, size, slot, BAR index)
        self.add(HostBridge(), slot=0)
        self.ecam = Ecam(self)

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Put a function on bus 0 (in the first free slot) and allocate its BARs."""
        if slot is None:
            slot = next((n for n in range(SLOTS) if n not in self.slots), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full (32 slots)")
        self.slots[slot] = _Slot(function, self.windows)
        return slot

    def bar_address(self, slot: int, index: int) -> int:
        entry = self.slots[slot]
        return entry.address(entry.specs[index])

    # --- configuration space, by (slot, function, register) ------------------------------
    def config_read(self, slot: int, function: int, register: int, size: int) -> bytes:
        with self.lock:
            entry = self.slots.get(slot) if function == 0 else None
            if entry is None:
                return b"\xff" * size
            if register in BAR_REGISTERS:
                offset = register - BAR_REGISTERS.start
                return bytes(entry.registers[offset:offset + size]).ljust(size, b"\0")
            if register == EXPANSION_ROM:
                return bytes(size)  # no option ROM
            return entry.function.config_read(register, size)

    def config_write(self, slot: int, function: int, register: int, data: bytes) -> None:
        with self.lock:
            entry = self.slots.get(slot) if function == 0 else None
            if entry is None or register == EXPANSION_ROM:
                return
            if register in BAR_REGISTERS:
                entry.write_bars(register, data)
            else:
                entry.function.config_write(register, data)
                if register <= COMMAND < register + len(data):
                    entry.memory_enabled = bool(data[COMMAND - register] & COMMAND_MEMORY)
                else:
                    return
            self._remap()

    def _remap(self) -> None:
        """Recompute which BARs decode where, and tell functions whose BAR moved."""
        before = {(id(slot), index): base for base, _, slot, index in self.mapped}
        self.mapped = []
        for slot in self.slots.values():
            for index, base in slot.mapping().items():
                if base is not None and base != 0:
                    self.mapped.append((base, slot.specs[index].size, slot, index))
                if before.get((id(slot), index)) != base:
                    slot.function.bar_mapped(index, base or None)

    # --- BAR windows (MMIO bus devices) -----------------------------------------------------
    def _find_bar(self, address: int):
        with self.lock:
            for base, size, slot, index in self.mapped:
                if base <= address < base + size:
                    return slot.function, index, address - base
        return None

    def bar_window(self, base: int) -> "BarWindowDevice":
        return BarWindowDevice(self, base)


class Ecam:
    """PCIe enhanced configuration access for bus 0: 4 KiB per function at slot << 15 | fn << 12."""

    SIZE = 1 << 20  # one bus

    def __init__(self, root: PciRoot):
        self.root = root

    def _target(self, offset: int, size: int) -> tuple[int, int, int] | None:
        register = offset & 0xFFF
        if register + size > 0x1000 or size not in (1, 2, 4):
            return None
        return (offset >> 15) & 0x1F, (offset >> 12) & 7, register

    def read(self, offset: int, size: int) -> bytes:
        target = self._target(offset, size)
        return self.root.config_read(*target, size) if target else b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        target = self._target(offset, len(data))
        if target:
            self.root.config_write(*target, data)


class BarWindowDevice:
    """One BAR window on the MMIO bus: dispatches to whichever BAR decodes the address."""

    def __init__(self, root: PciRoot, base: int):
        self.root, self.base = root, base

    def read(self, offset: int, size: int) -> bytes:
        found = self.root._find_bar(self.base + offset)
        if found is None:
            return b"\xff" * size
        function, index, bar_offset = found
        return function.bar_read(index, bar_offset, size)

    def write(self, offset: int, data: bytes) -> None:
        found = self.root._find_bar(self.base + offset)
        if found is not None:
            function, index, bar_offset = found
            function.bar_write(index, bar_offset, data)
