"""Guest RAM: one memfd, mapped shared, laid out around the x86 MMIO hole.

Shared by main (which creates it and hands it to KVM) and the device children (which
inherit the mapping across fork and read queues and buffers through `slice`).

One memfd rather than anonymous memory so that device children can map the very same
pages (inherited across fork, or passed over a socket). It is sealed against shrinking:
a child that truncated it would make main fault (SIGBUS) on every access past the new end.

Guest-physical layout:
  0 .. 3 GiB          RAM (the first 1 MiB has the legacy holes marked reserved in e820)
  3 GiB .. 3.5 GiB    MMIO hole: the 32-bit PCI BAR window
  3.5 GiB .. +1 MiB   PCI ECAM (bus 0), reserved in e820 as Linux wants before it trusts MCFG
  .. 4 GiB            IOAPIC, LAPIC, the TSS pages
  4 GiB ..            the rest of RAM when --mem is larger than 3 GiB
  then                the 64-bit PCI BAR window, from the next GiB boundary above RAM
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
PCI_WINDOW32 = (MMIO_HOLE_START, 512 * MiB)
ECAM_BASE, ECAM_SIZE = 0xE0000000, 1 * MiB
PCI_WINDOW64_SIZE = 64 * GiB
EBDA_START = 0x9FC00  # conventional memory ends here; BIOS data, VGA and ROM follow
HIGH_MEMORY_START = 1 * MiB

E820_RAM = 1
E820_RESERVED = 2


class GuestMemoryError(ValueError):
    """A guest-physical range that is not entirely RAM."""


@dataclass(frozen=True)
class Region:
    guest_address: int
    size: int
    file_offset: int  # where this region starts in the memfd (and in our mapping)

    @property
    def end(self) -> int:
        return self.guest_address + self.size


def ram_regions(size: int) -> list[Region]:
    low = min(size, MMIO_HOLE_START)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(MMIO_HOLE_END, size - low, low))
    return regions


def pci_window64(size: int) -> tuple[int, int]:
    """(base, size) of the 64-bit BAR window: above all RAM, GiB-aligned."""
    ram_end = ram_regions(size)[-1].end
    return max(MMIO_HOLE_END, -(-ram_end // GiB) * GiB), PCI_WINDOW64_SIZE


def e820_map(size: int) -> list[tuple[int, int, int]]:
    """(address, length, type) entries for boot_params."""
    low, *high = ram_regions(size)
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
        (HIGH_MEMORY_START, low.size - HIGH_MEMORY_START, E820_RAM),
    ]
    entries.append((ECAM_BASE, ECAM_SIZE, E820_RESERVED))
    entries += [(region.guest_address, region.size, E820_RAM) for region in high]
    return entries


class GuestMemory:
    def __init__(self, size: int, name: str = "sandvmm-guest-ram"):
        self.size = size
        self.regions = ram_regions(size)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        self.mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Huge pages where the host allows them for shared memory (transparent_hugepage/
        # shmem_enabled advise or always): the guest's first touch of its RAM then costs one
        # fault per 2 MiB instead of per 4 KiB, which under nested KVM is most of early boot.
        try:
            self.mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without THP
        self.view = memoryview(self.mapping)
        self._readonly_view = self.view.toreadonly()
        self._low_end = self.regions[0].end

    def offset(self, address: int, length: int) -> int:
        """Where [address, address+length) lives in our mapping; it must not cross a region."""
        for region in self.regions:
            if region.guest_address <= address and address + length <= region.end and length >= 0:
                return region.file_offset + address - region.guest_address
        raise GuestMemoryError(f"guest range {address:#x}+{length:#x} is not RAM")

    def slice(self, address: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM."""
        # The data path calls this per descriptor: the common case (low RAM, where the
        # region's guest address equals its offset in our mapping) skips the region search.
        if 0 <= address and 0 <= length and address + length <= self._low_end:
            return self.view[address:address + length]
        start = self.offset(address, length)
        return self.view[start:start + length]

    def identity_views(self) -> tuple[int, memoryview, memoryview]:
        """(end, writable view, read-only view) of guest RAM [0, end), indexed by guest address.

        For a caller that slices many buffers itself (the virtqueue walking an indirect
        table): low RAM starts the mapping, so a guest address is its offset in these
        views. Slicing them yourself skips `slice()`'s checks: check `address + length <=
        end` first. One read-only view made here saves a `toreadonly()` per buffer.
        """
        return self._low_end, self.view, self._readonly_view

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.slice(address, length))

    def write(self, address: int, data: bytes) -> None:
        self.slice(address, len(data))[:] = data

    def close(self) -> None:
        self._readonly_view.release()
        self.view.release()
        self.mapping.close()
        os.close(self.fd)
