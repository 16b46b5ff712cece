"""qcow2 host cluster allocation: the refcount table, refcount blocks and the allocator.

Increments are written through at once; the caller publishes a reference to a new
cluster (an L2 or L1 entry) only after a sync, so a crash leaves at worst a leaked cluster.
Decrements are applied by the caller only once the reference is durably gone.
New refcount blocks and a moved refcount table are made durable before anything points
at them, for the same reason.
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict

from sandvmm.devices.block.disk import DiskError, FileIO
from sandvmm.devices.block.qcow2_format import OFFSET_MASK, Qcow2Header

REFCOUNT_TABLE_HEADER = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
REFCOUNT_TABLE_HEADER_OFFSET = 48


def read_table(io: FileIO, offset: int, entries: int) -> array:
    """A table of big-endian u64 entries (L1, refcount table) as native integers."""
    table = array("Q", io.read(offset, entries * 8))
    table.byteswap()
    return table


def table_bytes(table: array) -> bytes:
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


class Refcounts:
    """Reference counts of the host clusters of one writable image."""

    def __init__(self, io: FileIO, header: Qcow2Header, metadata: set[int], *, name: str,
                 cache_bytes: int = 4 << 20) -> None:
        self.io = io
        self.name = name
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bits = 1 << header.refcount_order
        self.max = (1 << self.bits) - 1
        self.entries_per_block = self.cluster_size * 8 // self.bits
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.table = read_table(io, self.table_offset, self.table_clusters * self.cluster_size // 8)
        self.metadata = metadata  # host cluster indexes holding metadata: never handed out as data
        self.metadata.update(self._clusters(self.table_offset, self.table_clusters))
        self.block_clusters = {(entry & OFFSET_MASK) >> self.cluster_bits for entry in self.table
                               if entry & OFFSET_MASK}
        self.metadata.update(self.block_clusters)
        self.blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.cache_blocks = max(4, cache_bytes >> self.cluster_bits)
        self.free_hint = 0  # no free cluster below this one

    def counts_itself_at(self, cluster: int) -> bool:
        """Whether the refcount table or a refcount block lives in this host cluster."""
        return cluster in self.block_clusters or cluster in self._clusters(self.table_offset, self.table_clusters)

    def _clusters(self, offset: int, count: int) -> range:
        first = offset >> self.cluster_bits
        return range(first, first + count)

    # --- one entry ---------------------------------------------------------------------

    def _block(self, index: int) -> bytearray | None:
        if index >= len(self.table):
            return None
        entry = self.table[index]
        offset = entry & OFFSET_MASK
        if not offset:
            return None
        if entry & ~OFFSET_MASK or offset & (self.cluster_size - 1):
            raise DiskError(f"{self.name}: corrupt refcount table entry {index} ({entry:#x})")
        block = self.blocks.get(offset)
        if block is None:
            block = self.io.read(offset, self.cluster_size)
            self.blocks[offset] = block
            if len(self.blocks) > self.cache_blocks:
                self.blocks.popitem(last=False)  # written through: nothing to save
        else:
            self.blocks.move_to_end(offset)
        return block

    def _decode(self, block: bytearray, slot: int) -> int:
        bits = self.bits
        if bits == 16:
            return block[2 * slot] << 8 | block[2 * slot + 1]
        if bits >= 8:
            width = bits >> 3
            return int.from_bytes(block[slot * width:(slot + 1) * width], "big")
        bit = slot * bits
        return block[bit >> 3] >> (bit & 7) & self.max

    def _encode(self, block: bytearray, slot: int, value: int) -> tuple[int, int]:
        """Store value; returns the byte range written."""
        bits = self.bits
        if bits >= 8:
            width = bits >> 3
            block[slot * width:(slot + 1) * width] = value.to_bytes(width, "big")
            return slot * width, (slot + 1) * width
        bit = slot * bits
        byte = bit >> 3
        block[byte] = block[byte] & ~(self.max << (bit & 7)) & 0xFF | value << (bit & 7)
        return byte, byte + 1

    def get(self, cluster: int) -> int:
        block = self._block(cluster // self.entries_per_block)
        return 0 if block is None else self._decode(block, cluster % self.entries_per_block)

    # --- changes -----------------------------------------------------------------------

    def _change(self, clusters, delta: int) -> None:
        """Add delta to each cluster's refcount, writing each touched block's changed bytes."""
        by_block: dict[int, list[int]] = {}
        for cluster in clusters:
            by_block.setdefault(cluster // self.entries_per_block, []).append(cluster)
        for index, members in sorted(by_block.items()):
            block = self._block(index)
            if block is None:
                raise DiskError(f"{self.name}: no refcount block for cluster {members[0]} (image corrupt)")
            low, high = len(block), 0
            for cluster in members:
                slot = cluster % self.entries_per_block
                value = self._decode(block, slot) + delta
                if not 0 <= value <= self.max:
                    raise DiskError(f"{self.name}: refcount of cluster {cluster} would be {value}, outside 0.."
                                    f"{self.max} (image corrupt: run qemu-img check -r all)")
                start, end = self._encode(block, slot, value)
                low, high = min(low, start), max(high, end)
                if value == 0:
                    self.free_hint = min(self.free_hint, cluster)
            self.io.write((self.table[index] & OFFSET_MASK) + low, memoryview(block)[low:high])

    def free(self, clusters) -> None:
        self._change(clusters, -1)

    def allocate(self, count: int) -> list[int]:
        """`count` free clusters, first fit from the lowest free one (contiguous when the
        free space is), each with its refcount now 1 (written, not yet synced)."""
        picked: list[int] = []
        cluster = self.free_hint
        per_block = self.entries_per_block
        while len(picked) < count:
            index = cluster // per_block
            if index >= len(self.table):
                self._grow_table(index + 1, cluster)
                continue  # the new table and blocks may sit right here: look again
            if not self.table[index] & OFFSET_MASK:
                self._create_block(index, cluster)
            elif self.get(cluster) == 0:
                if cluster in self.metadata:
                    raise DiskError(f"{self.name}: metadata cluster {cluster} has refcount 0 (image corrupt:"
                                    " run qemu-img check -r all)")
                picked.append(cluster)
            cluster += 1
        self.free_hint = cluster
        self._change(picked, +1)
        return picked

    def _create_block(self, index: int, cluster: int) -> None:
        """A refcount block for range `index`, stored in that range's (free) `cluster`."""
        if cluster in self.metadata:
            raise DiskError(f"{self.name}: metadata cluster {cluster} has no refcount block (image corrupt)")
        block = bytearray(self.cluster_size)
        self._encode(block, cluster - index * self.entries_per_block, 1)  # it counts itself
        offset = cluster << self.cluster_bits
        self.io.write(offset, block)
        self.io.sync()  # the block is durable before the table points at it
        self.io.write(self.table_offset + 8 * index, struct.pack(">Q", offset))
        self.table[index] = offset
        self.blocks[offset] = block
        self.metadata.add(cluster)
        self.block_clusters.add(cluster)

    def _end_of_allocations(self) -> int:
        """One past the last cluster with a refcount (not the file size: a qcow2 image on a
        block device has no meaningful one, and this needs no fstat in the jailed child)."""
        for index in range(len(self.table) - 1, -1, -1):
            block = self._block(index)
            if block is None:
                continue
            for slot in range(self.entries_per_block - 1, -1, -1):
                if self._decode(block, slot):
                    return index * self.entries_per_block + slot + 1
        return 0

    def _grow_table(self, min_entries: int, lower_bound: int) -> None:
        """Move the refcount table to a larger copy at the end of the file.

        The new table and the refcount blocks that count it (and themselves) go in one free
        run: [table][new blocks]. Durable before the header names it; the old table is
        freed after the header is durable.
        """
        per_block = self.entries_per_block
        start = max(lower_bound, self._end_of_allocations())
        entries = max(min_entries, 2 * len(self.table))
        while True:
            table_clusters = -(-entries * 8 // self.cluster_size)
            new_blocks: list[int] = []
            while True:
                end = start + table_clusters + len(new_blocks)
                missing = [index for index in range(start // per_block, (end - 1) // per_block + 1)
                           if index >= len(self.table) or not self.table[index] & OFFSET_MASK]
                if len(missing) == len(new_blocks):
                    break
                new_blocks = missing
            if new_blocks and new_blocks[-1] >= entries:
                entries = new_blocks[-1] + 1
                continue
            busy = [cluster for cluster in range(start, end) if self.get(cluster) or cluster in self.metadata]
            if busy:
                start = busy[-1] + 1
                continue
            break

        blocks_start = start + table_clusters
        table = array("Q", self.table)
        table.extend([0] * (table_clusters * self.cluster_size // 8 - len(table)))
        new_block_data = {}
        for position, index in enumerate(new_blocks):
            table[index] = (blocks_start + position) << self.cluster_bits
            new_block_data[index] = bytearray(self.cluster_size)
        existing = []
        for cluster in range(start, end):
            index = cluster // per_block
            if index in new_block_data:
                self._encode(new_block_data[index], cluster - index * per_block, 1)
            else:
                existing.append(cluster)
        self._change(existing, +1)
        for index, block in new_block_data.items():
            self.io.write(table[index], block)
        self.io.write(start << self.cluster_bits, table_bytes(table))
        self.io.sync()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.io.write(REFCOUNT_TABLE_HEADER_OFFSET,
                      REFCOUNT_TABLE_HEADER.pack(start << self.cluster_bits, table_clusters))
        self.io.sync()
        self.table, self.table_offset, self.table_clusters = table, start << self.cluster_bits, table_clusters
        for index, block in new_block_data.items():
            self.blocks[table[index]] = block
            self.block_clusters.add(table[index] >> self.cluster_bits)
        old = self._clusters(old_offset, old_clusters)
        self.metadata.difference_update(old)
        self.metadata.update(range(start, end))
        self.free(old)
