"""An MSI-X table and pending-bit array (PCI Local Bus 3.0, section 6.8.2) as pure state.

Each table entry is 16 bytes: message address low, message address high, message data,
vector control (bit 0 masks the vector; the other bits are reserved and read as zero).
Entries start masked, as after a PCI reset. An interrupt on a masked vector sets the
vector's bit in the pending-bit array (PBA) instead of being sent; the owner sends it once
the vector is unmasked.

The Message Control register (MSI-X Enable, Function Mask) lives in configuration space with
the capability, so the owner of configuration space combines it with the per-entry masks
kept here.
"""

from __future__ import annotations

ENTRY_SIZE = 16
VECTOR_CONTROL = 12  # offset of vector control within an entry
VECTOR_MASKED = 1
# Which bits of each entry byte software may change. The address's two low bits are
# hardwired to zero (the spec leaves other values undefined), as are reserved control bits.
_ENTRY_WRITABLE = bytes([0xFC, 0xFF, 0xFF, 0xFF] + [0xFF] * 8 + [VECTOR_MASKED, 0, 0, 0])


def padded_slice(data: bytes | bytearray, offset: int, size: int) -> bytes:
    """`size` bytes of `data` from `offset`; whatever lies outside `data` reads as zero."""
    if offset < 0:
        return bytes(size)
    return bytes(data[offset:offset + size]).ljust(size, b"\0")


class MsixTable:
    def __init__(self, vector_count: int):
        if not 1 <= vector_count <= 2048:
            raise ValueError(f"an MSI-X table has 1 to 2048 entries, not {vector_count}")
        self.vector_count = vector_count
        self._table = bytearray(ENTRY_SIZE * vector_count)
        for vector in range(vector_count):
            self._table[vector * ENTRY_SIZE + VECTOR_CONTROL] = VECTOR_MASKED
        self.pending = 0  # bit n: vector n has an interrupt waiting for its unmask
        self._routed: dict[int, tuple[int, int]] = {}  # the message last reported per vector

    @property
    def table_size(self) -> int:
        return len(self._table)

    @property
    def pba_size(self) -> int:
        return 8 * -(-self.vector_count // 64)  # whole QWORDs, as the spec lays the PBA out

    def message(self, vector: int) -> tuple[int, int]:
        """(address, data) of a vector's entry."""
        base = vector * ENTRY_SIZE
        entry = self._table[base:base + ENTRY_SIZE]
        return int.from_bytes(entry[0:8], "little"), int.from_bytes(entry[8:12], "little")

    def masked(self, vector: int) -> bool:
        return bool(self._table[vector * ENTRY_SIZE + VECTOR_CONTROL] & VECTOR_MASKED)

    def read_table(self, offset: int, size: int) -> bytes:
        return padded_slice(self._table, offset, size)

    def write_table(self, offset: int, data: bytes) -> list[int]:
        """Apply a write of any size or alignment; return the vectors to route anew.

        Those are the unmasked vectors whose message is not the one last returned: a masked
        vector sends nothing, and drivers mask an entry while they rewrite it (Linux does),
        so its route changes once, at the unmask, not at every intermediate write.
        """
        first = max(offset, 0) // ENTRY_SIZE
        last = min(offset + len(data), len(self._table)) // ENTRY_SIZE + 1
        for index, byte in enumerate(data):
            position = offset + index
            if 0 <= position < len(self._table):
                mask = _ENTRY_WRITABLE[position % ENTRY_SIZE]
                self._table[position] = (self._table[position] & ~mask) | (byte & mask)
        changed = []
        for vector in range(first, min(last, self.vector_count)):
            message = self.message(vector)
            if not self.masked(vector) and self._routed.get(vector) != message:
                self._routed[vector] = message
                changed.append(vector)
        return changed

    def read_pba(self, offset: int, size: int) -> bytes:
        return padded_slice(self.pending.to_bytes(self.pba_size, "little"), offset, size)

    def set_pending(self, vector: int) -> None:
        self.pending |= 1 << vector

    def take_unmasked_pending(self) -> list[int]:
        """Clear and return the pending vectors whose entries are no longer masked."""
        if not self.pending:
            return []
        ready = [vector for vector in range(self.vector_count)
                 if self.pending >> vector & 1 and not self.masked(vector)]
        for vector in ready:
            self.pending &= ~(1 << vector)
        return ready
