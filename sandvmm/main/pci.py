"""The PCI root: configuration space through I/O ports 0xCF8/0xCFC (PCI mechanism #1).

For now bus 0 holds only the host bridge at 00:00.0, which is what Linux needs to find a
working PCI configuration mechanism (its sanity check looks for a host bridge). Virtio
devices join this bus in the process-per-device work.
"""

from __future__ import annotations

import struct
import threading

CONFIG_ADDRESS_PORT = 0xCF8  # and CONFIG_DATA at 0xCFC: register both as one 8-byte range
ENABLE = 1 << 31
CLASS_HOST_BRIDGE = 0x060000
# Red Hat's generic host-bridge ID: a bridge no guest driver claims or quirks.
VENDOR_REDHAT, DEVICE_HOST_BRIDGE = 0x1B36, 0x0008


class ConfigSpace:
    """256 bytes of type-0 configuration header; reads anywhere, writes only where writable."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0):
        self.data = bytearray(256)
        struct.pack_into("<HH", self.data, 0x00, vendor, device)
        struct.pack_into("<I", self.data, 0x08, (class_code << 8) | revision)
        self.writable = bytearray(256)
        self.writable[0x04:0x06] = b"\x07\x05"  # command: I/O, memory, bus master, SERR, INTx disable

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            mask = self.writable[offset + index] if offset + index < 256 else 0
            self.data[offset + index] = (self.data[offset + index] & ~mask) | (byte & mask)


class PciRoot:
    def __init__(self):
        self.lock = threading.Lock()
        self.address = 0
        self.functions: dict[tuple[int, int, int], ConfigSpace] = {
            (0, 0, 0): ConfigSpace(VENDOR_REDHAT, DEVICE_HOST_BRIDGE, CLASS_HOST_BRIDGE),
        }

    def _target(self, offset: int) -> tuple[ConfigSpace | None, int]:
        if not self.address & ENABLE:
            return None, 0
        bus, slot, function = (self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 7
        register = (self.address & 0xFC) + (offset - 4)
        return self.functions.get((bus, slot, function)), register

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset == 0 and size == 4:
                return struct.pack("<I", self.address)
            if offset < 4:
                return b"\xff" * size
            space, register = self._target(offset)
            if space is None or register + size > 256:
                return b"\xff" * size
            return space.read(register, size)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset == 0 and len(data) == 4:
                self.address = struct.unpack("<I", data)[0] & 0x80FFFFFC
            elif offset >= 4:
                space, register = self._target(offset)
                if space is not None and register + len(data) <= 256:
                    space.write(register, data)
