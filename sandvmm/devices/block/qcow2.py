"""Qcow2Disk: a qcow2 (v2 or v3) image on an open fd, over an optional backing Disk.

Mapping: guest cluster -> L1 entry -> L2 table -> L2 entry -> host cluster. The L1 table
stays in memory; L2 tables are cached (bounded). Crash safety comes from the order in
which things reach the disk (docs/devices/block-images.md has the argument):

  1. a new cluster's refcount is written the moment it is allocated (Refcounts);
  2. guest data is written to it;
  3. the L2 entries naming it change only in memory, and reach the disk in flush(),
     after an fdatasync that makes 1 and 2 durable;
  4. L1 entries naming new L2 tables are written after a second fdatasync;
  5. refcounts of clusters no longer referenced drop only after the L2/L1 writes that
     dropped the references are durable.

A crash at any point therefore loses at most unflushed writes and leaks clusters; it never
leaves an entry pointing at a cluster whose refcount is 0 or whose contents were not written.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections import OrderedDict
from typing import Iterator, Sequence

from sandvmm.devices.block.disk import (ZEROS, Disk, DiskError, FileIO, ImageError, byte_views,
                                        fill_zeros, total_length)
from sandvmm.devices.block.qcow2_format import (COMPRESSED, COPIED, MAX_CLUSTER_BITS, OFFSET_MASK, ZERO,
                                                create_qcow2, parse_header)
from sandvmm.devices.block.qcow2_refcount import Refcounts, read_table, table_bytes

__all__ = ["Qcow2Disk", "create_qcow2"]

UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED_KIND = range(5)
# What a read of a run of clusters does:
READ_HOST, READ_ZEROS, READ_BACKING, READ_COMPRESSED = range(4)
L1_RESERVED = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62
L2_RESERVED = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61 of a standard cluster descriptor
AUTOCLEAR_OFFSET = 88
DISCARD, ZERO_KEEP, ZERO_UNMAP = range(3)


class ViewCursor:
    """Hands out consecutive byte ranges of a scatter/gather list without copying."""

    def __init__(self, views: list[memoryview]) -> None:
        self.views, self.index, self.offset = views, 0, 0

    def take(self, count: int) -> list[memoryview]:
        taken = []
        while count:
            view = self.views[self.index]
            available = view.nbytes - self.offset
            if available > count:
                taken.append(view[self.offset:self.offset + count])
                self.offset += count
                return taken
            taken.append(view[self.offset:] if self.offset else view)
            count -= available
            self.index, self.offset = self.index + 1, 0
        return taken


class Qcow2Disk:
    def __init__(self, fd: int, backing: Disk | None, read_only: bool, *, name: str = "",
                 buffered_fd: int | None = None, io: FileIO | None = None, cache_bytes: int = 16 << 20) -> None:
        """Open the qcow2 image on `fd` (ImageError if it cannot be used as asked).

        backing: the already opened backing image, or None to read unallocated clusters as
        zeros. buffered_fd: see FileIO (O_DIRECT). io: replaces FileIO(fd) (tests inject
        faults through it). The disk owns its fds and backing once open (close() closes
        them); if opening fails they stay the caller's.
        """
        self.io = io or FileIO(fd, name=name, buffered_fd=buffered_fd)
        self.name = name or self.io.name
        try:
            head = self.io.read(0, 512)
            cluster_bits = min(max(struct.unpack_from(">I", head, 20)[0], 9), MAX_CLUSTER_BITS)
            header = parse_header(self.io.read(0, 1 << cluster_bits), self.name)
        except DiskError as error:
            raise ImageError(str(error)) from None
        if not read_only:
            _check_writable(header, self.name)
        self.header = header
        self.backing = backing
        self.read_only = read_only
        self.size = header.size
        self.v3 = header.version == 3
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_bits = self.cluster_bits - 3
        self.compressed_offset_bits = 62 - (self.cluster_bits - 8)
        try:
            self.l1 = read_table(self.io, header.l1_table_offset, header.l1_size)
        except DiskError as error:
            raise ImageError(str(error)) from None
        self.l2_cache: OrderedDict[int, array] = OrderedDict()
        self.l2_cache_limit = max(8, cache_bytes >> self.cluster_bits)
        self.l2_dirty: dict[int, list[int] | None] = {}  # table offset -> [low, high) entries, None: all
        self.l1_dirty: set[int] = set()
        self.l2_checked: set[int] = set()  # L2 tables found fit to be changed
        self.pending_frees: list[int] = []  # host clusters to release once their references are gone for good
        self.last_compressed: tuple[int, bytes] = (0, b"")
        self.refcounts: Refcounts | None = None
        if not read_only:
            try:
                self._open_writable()
            except DiskError as error:
                raise ImageError(str(error)) from None

    def _open_writable(self) -> None:
        header = self.header
        metadata = {0}  # host clusters never to be handed out or written as guest data
        first_l1 = header.l1_table_offset >> self.cluster_bits
        self.l1_clusters = range(first_l1, first_l1 + -(-header.l1_size * 8 // self.cluster_size))
        metadata.update(self.l1_clusters)
        metadata.update((entry & OFFSET_MASK) >> self.cluster_bits for entry in self.l1 if entry & OFFSET_MASK)
        self.refcounts = Refcounts(self.io, header, metadata, name=self.name)
        if header.autoclear:  # the spec's price for writing: we keep no bitmaps, so they go stale
            self.io.write(AUTOCLEAR_OFFSET, bytes(8))
            self.io.sync()

    # --- mapping -----------------------------------------------------------------------

    def _l2_table(self, l1_index: int, create: bool = False) -> tuple[int, array | None]:
        entry = self.l1[l1_index]
        offset = entry & OFFSET_MASK
        if not offset:
            if not create:
                return 0, None
            offset = self._new_l2_table(l1_index)
            return offset, self.l2_cache[offset]
        if entry & L1_RESERVED or offset & (self.cluster_size - 1):
            raise DiskError(f"{self.name}: corrupt L1 entry {l1_index} ({entry:#x})")
        table = self.l2_cache.get(offset)
        if table is None:
            table = read_table(self.io, offset, 1 << self.l2_bits)
            self.l2_cache[offset] = table
        else:
            self.l2_cache.move_to_end(offset)
        if create and offset not in self.l2_checked:  # about to change it: ours alone, not on other metadata
            cluster = offset >> self.cluster_bits
            if cluster == 0 or cluster in self.l1_clusters or self.refcounts.counts_itself_at(cluster):
                raise DiskError(f"{self.name}: L2 table at {offset:#x} overlaps other metadata (image corrupt)")
            self._check_refcount_one(offset, "L2 table")
            if not entry & COPIED:
                self.l1[l1_index] = entry | COPIED
                self.l1_dirty.add(l1_index)
            self.l2_checked.add(offset)  # L2 tables are never freed: the answer stays true
        return offset, table

    def _new_l2_table(self, l1_index: int) -> int:
        (cluster,) = self.refcounts.allocate(1)
        self.refcounts.metadata.add(cluster)
        offset = cluster << self.cluster_bits
        self.l2_cache[offset] = array("Q", bytes(self.cluster_size))
        self.l2_dirty[offset] = None  # a reused cluster holds old bytes: write the whole table
        self.l2_checked.add(offset)
        self.l1[l1_index] = offset | COPIED
        self.l1_dirty.add(l1_index)
        return offset

    def _check_refcount_one(self, offset: int, what: str) -> None:
        count = self.refcounts.get(offset >> self.cluster_bits)
        if count != 1:
            raise DiskError(f"{self.name}: {what} at {offset:#x} has refcount {count}, not 1 (shared or"
                            " image corrupt: qemu-img check)")

    def _set_l2(self, table_offset: int, table: array, index: int, entry: int) -> None:
        table[index] = entry
        if table_offset not in self.l2_dirty:
            self.l2_dirty[table_offset] = [index, index + 1]
        elif (span := self.l2_dirty[table_offset]) is not None:
            span[0], span[1] = min(span[0], index), max(span[1], index + 1)

    def _kind(self, entry: int) -> int:
        if entry & COMPRESSED:
            return COMPRESSED_KIND
        offset = entry & OFFSET_MASK
        if entry & L2_RESERVED or offset & (self.cluster_size - 1) or (entry & ZERO and not self.v3):
            raise DiskError(f"{self.name}: corrupt L2 entry {entry:#x}")
        if entry & ZERO:
            return ZERO_ALLOC if offset else ZERO_PLAIN
        return NORMAL if offset else UNALLOCATED

    def _entry(self, guest_cluster: int) -> tuple[int, array | None, int]:
        """(L2 table offset, table, index) of a guest cluster; table None: no L2 table."""
        offset, table = self._l2_table(guest_cluster >> self.l2_bits)
        return offset, table, guest_cluster & ((1 << self.l2_bits) - 1)

    def _read_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(what, guest offset, length, host offset or L2 entry), adjacent alike runs merged."""
        run = None
        end = offset + length
        while offset < end:
            cluster = offset >> self.cluster_bits
            _, table, index = self._entry(cluster)
            if table is None:  # no L2 table: the rest of its span is unallocated
                span_end = ((cluster >> self.l2_bits) + 1) << (self.l2_bits + self.cluster_bits)
                count = min(end, span_end) - offset
                entry = 0
            else:
                count = min(end, (cluster + 1) << self.cluster_bits) - offset
                entry = table[index]
            kind = self._kind(entry)
            within = offset & (self.cluster_size - 1)
            if kind == NORMAL:
                what, where = READ_HOST, (entry & OFFSET_MASK) + within
            elif kind == COMPRESSED_KIND:
                what, where = READ_COMPRESSED, entry
            elif kind == UNALLOCATED and self.backing is not None and offset < self.backing.size:
                what, where = READ_BACKING, 0
            else:
                what, where = READ_ZEROS, 0
            if run and run[0] == what and what != READ_COMPRESSED and (what != READ_HOST or run[3] + run[2] == where):
                run[2] += count
            else:
                if run:
                    yield tuple(run)
                run = [what, offset, count, where]
            offset += count
        if run:
            yield tuple(run)

    # --- reads -------------------------------------------------------------------------

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers)
        length = total_length(views)
        self._check_range(offset, length)
        self._trim_cache()
        if length and not (offset ^ (offset + length - 1)) >> self.cluster_bits:
            # The common small request inside one cluster: no run bookkeeping.
            _, table, index = self._entry(offset >> self.cluster_bits)
            entry = table[index] if table is not None else 0
            if self._kind(entry) == NORMAL:
                return self.io.read_into((entry & OFFSET_MASK) + (offset & (self.cluster_size - 1)), views)
        self._read(offset, length, ViewCursor(views))

    def _read(self, offset: int, length: int, cursor: ViewCursor) -> None:
        for what, guest, count, where in self._read_runs(offset, length):
            part = cursor.take(count)
            if what == READ_HOST:
                self.io.read_into(where, part)
            elif what == READ_ZEROS:
                fill_zeros(part)
            elif what == READ_BACKING:  # a shorter backing file reads as zeros past its end
                inside = min(count, self.backing.size - guest)
                pieces = ViewCursor(part)
                self.backing.read_into(guest, pieces.take(inside))
                fill_zeros(pieces.take(count - inside))
            else:
                data = self._decompress(where)
                within = guest & (self.cluster_size - 1)
                position = within
                for view in part:
                    view[:] = data[position:position + view.nbytes]
                    position += view.nbytes

    def _read_bytes(self, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        if length:
            self._read(offset, length, ViewCursor([memoryview(data)]))
        return data

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        offset = entry & ((1 << self.compressed_offset_bits) - 1)
        sectors = (entry >> self.compressed_offset_bits & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return offset, (offset & ~511) + sectors * 512 - offset

    def _decompress(self, entry: int) -> bytes:
        if self.last_compressed[0] == entry:
            return self.last_compressed[1]
        offset, length = self._compressed_span(entry)
        try:
            data = zlib.decompressobj(-15).decompress(bytes(self.io.read(offset, length)), self.cluster_size)
        except zlib.error as error:
            raise DiskError(f"{self.name}: compressed cluster at {offset:#x} does not inflate ({error})") from None
        if len(data) != self.cluster_size:
            raise DiskError(f"{self.name}: compressed cluster at {offset:#x} inflates to {len(data)} bytes")
        self.last_compressed = (entry, data)
        return data

    def _compressed_clusters(self, entry: int) -> range:
        offset, length = self._compressed_span(entry)
        return range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1)

    # --- writes ------------------------------------------------------------------------

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check_writable()
        views = byte_views(buffers)
        length = total_length(views)
        self._check_range(offset, length)
        self._trim_cache()
        self._write(offset, length, ViewCursor(views))

    def _owned(self, entry: int) -> bool:
        """Whether a standard cluster may be written in place: it must be ours alone.

        The COPIED flag says so, but a corrupt image can lie, and the allocator would hand
        out a cluster whose refcount is 0 a second time: so the refcount is checked too.
        """
        if (entry & OFFSET_MASK) >> self.cluster_bits in self.refcounts.metadata:
            raise DiskError(f"{self.name}: L2 entry {entry:#x} points into metadata (image corrupt)")
        self._check_refcount_one(entry & OFFSET_MASK, "data cluster")
        return True

    def _write(self, offset: int, length: int, cursor: ViewCursor) -> None:
        if not length:
            return
        size = self.cluster_size
        first, last = offset >> self.cluster_bits, (offset + length - 1) >> self.cluster_bits
        plan = []
        hosts = set()
        for cluster in range(first, last + 1):
            start = max(offset, cluster << self.cluster_bits)
            end = min(offset + length, (cluster + 1) << self.cluster_bits)
            table_offset, table = self._l2_table(cluster >> self.l2_bits, create=True)
            index = cluster & ((1 << self.l2_bits) - 1)
            entry = table[index]
            kind = self._kind(entry)
            in_place = kind in (NORMAL, ZERO_ALLOC) and self._owned(entry)
            if in_place:
                if entry & OFFSET_MASK in hosts:
                    raise DiskError(f"{self.name}: two guest clusters map to host {entry & OFFSET_MASK:#x}"
                                    " (image corrupt)")
                hosts.add(entry & OFFSET_MASK)
            plan.append((cluster, start, end, table_offset, index, entry, kind, in_place))
        new_clusters = iter(self.refcounts.allocate(sum(1 for step in plan if not step[-1])))

        writes: list[list] = []  # [host offset, views, length], merged when contiguous
        updates = []
        for cluster, start, end, table_offset, index, entry, kind, in_place in plan:
            base = cluster << self.cluster_bits
            data = cursor.take(end - start)
            if in_place and kind == NORMAL:
                host = entry & OFFSET_MASK
                pieces, at = data, host + start - base
                if not entry & COPIED:
                    updates.append((table_offset, index, entry | COPIED, ()))
            else:
                if in_place:  # a preallocated zero cluster: its old bytes are not the guest's
                    host = entry & OFFSET_MASK
                    head, tail = ZEROS[:start - base], ZEROS[:base + size - end]
                else:
                    host = next(new_clusters) << self.cluster_bits
                    head = self._read_bytes(base, start - base)
                    tail = self._read_bytes(end, min(base + size, self.size) - end) if end < self.size else b""
                pieces, at = [memoryview(head), *data, memoryview(tail)], host
                freed = self._compressed_clusters(entry) if kind == COMPRESSED_KIND else ()
                updates.append((table_offset, index, host | COPIED, freed))
            length = sum(view.nbytes for view in pieces)
            if writes and writes[-1][0] + writes[-1][2] == at:
                writes[-1][1].extend(pieces)
                writes[-1][2] += length
            else:
                writes.append([at, list(pieces), length])
        for at, pieces, _ in writes:
            self.io.write_from(at, pieces)
        for table_offset, index, entry, freed in updates:  # after the data: see the module docstring
            self._set_l2(table_offset, self.l2_cache[table_offset], index, entry)
            self.pending_frees.extend(freed)

    # --- discard and write zeroes -------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length, DISCARD)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._zero(offset, length, ZERO_UNMAP if unmap else ZERO_KEEP)

    def _zero(self, offset: int, length: int, mode: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self._trim_cache()
        end = offset + length
        while offset < end:
            self._trim_cache()  # a long discard may cross many L2 tables; none is held between clusters
            cluster = offset >> self.cluster_bits
            base = cluster << self.cluster_bits
            stop = min(end, base + self.cluster_size)
            table_offset, table, index = self._entry(cluster)
            if table is None and self.backing is None:
                # no L2 table and nothing to hide: the whole span already reads zeros
                offset = min(end, ((cluster >> self.l2_bits) + 1) << (self.l2_bits + self.cluster_bits))
                continue
            entry = table[index] if table is not None else 0
            kind = self._kind(entry)
            if offset == base and stop == min(base + self.cluster_size, self.size):
                self._zero_cluster(cluster, table_offset, table, index, entry, kind, mode)
            elif self._partial_needs_zeros(kind, offset, mode, entry):
                self._write(offset, stop - offset, ViewCursor([memoryview(ZEROS)[:stop - offset]]))
            offset = stop

    def _partial_needs_zeros(self, kind: int, offset: int, mode: int, entry: int) -> bool:
        if mode == DISCARD:  # only where storage exists: a discard never allocates
            return kind == NORMAL and self._owned(entry)
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            return False
        return not (kind == UNALLOCATED and (self.backing is None or offset >= self.backing.size))

    def _zero_cluster(self, cluster: int, table_offset: int, table: array | None, index: int, entry: int,
                      kind: int, mode: int) -> None:
        host = entry & OFFSET_MASK
        owned = kind in (NORMAL, ZERO_ALLOC) and self._owned(entry)
        no_backing = self.backing is None
        if self.v3:
            if mode == ZERO_KEEP and owned:
                new = host | ZERO | COPIED  # stays allocated, reads zeros
            elif no_backing and (mode != ZERO_KEEP or kind == UNALLOCATED):
                new = 0  # unallocated reads zeros when there is no backing file
            else:
                new = ZERO
        elif mode == DISCARD or (no_backing and (mode == ZERO_UNMAP or kind != NORMAL)):
            new = 0  # v2 has no zero flag; a discard may let the backing file show through
        elif owned:  # v2, must stay allocated or hide the backing file: real zeros
            return self.io.write_zero_range(host, self.cluster_size)
        else:
            base = cluster << self.cluster_bits
            length = min(self.cluster_size, self.size - base)
            return self._write(base, length, ViewCursor([memoryview(ZEROS)[:length]]))
        if new == entry:
            return
        table_offset, table = self._l2_table(cluster >> self.l2_bits, create=True)
        self._set_l2(table_offset, table, index, new)
        if owned and not new & OFFSET_MASK:
            self.pending_frees.append(host >> self.cluster_bits)
        elif kind == COMPRESSED_KIND:
            self.pending_frees.extend(self._compressed_clusters(entry))

    # --- flush, cache, close -----------------------------------------------------------

    def flush(self) -> None:
        if not self.read_only:
            self._sync_metadata()

    def _sync_metadata(self) -> None:
        if not (self.l2_dirty or self.l1_dirty or self.pending_frees):
            if self.io.unsynced:
                self.io.sync()
            return
        self.io.sync()  # new clusters' data and refcounts, before any table names them
        for offset, span in sorted(self.l2_dirty.items()):
            table = self.l2_cache[offset]
            low, high = span if span is not None else (0, len(table))
            self.io.write(offset + 8 * low, table_bytes(table[low:high]))
        self.l2_dirty.clear()
        if self.l1_dirty:
            self.io.sync()  # new L2 tables, before the L1 names them
            for low, high in _runs(sorted(self.l1_dirty)):
                self.io.write(self.header.l1_table_offset + 8 * low, table_bytes(self.l1[low:high]))
            self.l1_dirty.clear()
        self.io.sync()
        if self.pending_frees:  # references are durably gone: now the refcounts may drop
            frees, self.pending_frees = self.pending_frees, []
            self.refcounts.free(frees)

    def _trim_cache(self) -> None:
        """Evict L2 tables beyond the cache size (between requests only: a request holds tables)."""
        while len(self.l2_cache) > self.l2_cache_limit:
            offset = next(iter(self.l2_cache))
            if offset in self.l2_dirty:
                self._sync_metadata()
            del self.l2_cache[offset]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.name}: {length} bytes at {offset} lie outside the disk ({self.size} bytes)")

    def _check_writable(self) -> None:
        if self.read_only:
            raise DiskError(f"{self.name} is read-only")

    def close(self) -> None:
        try:
            if not self.read_only and self.io.fd >= 0:
                self.flush()
        finally:
            self.io.close()
            if self.backing is not None:
                self.backing.close()


def _check_writable(header, name: str) -> None:
    if header.dirty:
        raise ImageError(f"{name} was not closed cleanly (qcow2 dirty bit: lazy refcounts); repair it with"
                         " `qemu-img check -r all` or open it read-only")
    if header.corrupt:
        raise ImageError(f"{name} is marked corrupt; repair it with `qemu-img check -r all` or open it read-only")
    if header.nb_snapshots:
        raise ImageError(f"{name} has {header.nb_snapshots} internal snapshot(s), which sandvmm cannot write"
                         " around; open it read-only or delete them (qemu-img snapshot -d)")


def _runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """[low, high) ranges of consecutive sorted integers."""
    low = previous = indexes[0]
    for index in indexes[1:]:
        if index != previous + 1:
            yield low, previous + 1
            low = index
        previous = index
    yield low, previous + 1
