"""The virtio-blk device core (virtio 1.2, section 5.2), sans-I/O: requests in, disk calls out.

One request queue. Each chain is `struct virtio_blk_req`: a 16-byte header (type u32,
reserved u32, sector u64) in the device-readable part, then the data (readable for writes,
discard and write-zeroes segments; writable for reads and GET_ID), then one status byte,
the last byte of the device-writable part. Buffer boundaries mean nothing (1.0's implied
ANY_LAYOUT): a header may span descriptors, the status may share one with read data.

Every rule the guest can break ends as a status byte (IOERR or UNSUPP) and the device goes
on; only a request with no writable byte at all, which has nowhere to put a status, is
completed with nothing written and not executed. A malformed chain (GuestError with a
head) is completed with used length 0; a broken ring (GuestError without a head)
propagates to the shell, which asks the driver for a reset.

The disk calls are synchronous: `process()` executes available requests in ring order
until they are gone or, given a slice size, it has moved that much data; the shell raises
the interrupt and calls again. Requests are validated whole before the disk is touched, so
a refused request has no side effect.
Reads and writes hand the chain's memoryviews of guest RAM straight to the disk
(preadv/pwritev into guest buffers): no data is copied here.
"""

from __future__ import annotations

import struct

from sandvmm.devices.block.disk import DiskError
from sandvmm.devices.virtio.device import RING_FEATURES
from sandvmm.devices.virtio.queue import Chain, SplitQueue

VIRTIO_ID_BLOCK = 2
REQUEST_QUEUE = 0

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SHIFT = 9  # `sector` and `capacity` count 512-byte units whatever blk_size says
SECTOR_SIZE = 1 << SECTOR_SHIFT
ID_BYTES = 20  # GET_ID: a NUL-padded string, no terminator when it is exactly 20 bytes

# 512, not 4096: the logical block size is the unit the guest reads partition tables in,
# so 4096 would misplace every partition of an image made with 512-byte sectors (and
# refuse images whose size is not a multiple of 4 KiB). Topology advertises 4 KiB
# physical blocks instead, so that the guest still prefers page-sized, aligned I/O.
LOGICAL_BLOCK_SIZE = 512
DEFAULT_PHYSICAL_BLOCK_SIZE = 4096
# size_max is advice for the driver's segment merging; a bigger segment costs us nothing
# (it is one memoryview), so it is not enforced.
SIZE_MAX = 1 << 20
# Data one process() call moves before it returns, so that the interrupt for what is done
# goes out while the rest is still to copy: the driver reaps those requests and queues more
# meanwhile, on its own CPU. Four queued 1 MiB reads are ~3 ms of copying in the lab; one
# interrupt at the end of them left the guest idle that long (1 MiB reads went from 0.67
# to 1.18 of QEMU's throughput with two lab CPUs). 4 KiB requests rarely reach it. With one
# CPU the guest cannot run meanwhile, and the extra interrupts only cost (1 MiB writes
# 0.92 -> 0.57 in a 1-vCPU lab): main passes None there, one interrupt per kick.
SLICE_BYTES = 256 << 10
# One disk call per segment: the counts bound the work of one discard/write-zeroes request.
MAX_DISCARD_SEGMENTS = MAX_WRITE_ZEROES_SEGMENTS = 32
MAX_DISCARD_SECTORS = MAX_WRITE_ZEROES_SECTORS = 1 << 21  # 1 GiB per segment
# Hole punching on the host works in file-system blocks: a smaller discard frees nothing.
DISCARD_SECTOR_ALIGNMENT = 8

HEADER = struct.Struct("<I4xQ")  # type, reserved, sector
HEADER_SIZE = HEADER.size
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
# struct virtio_blk_config up to the secure-erase fields (72 bytes, 5.2.4):
# capacity, size_max, seg_max, geometry (cylinders u16, heads u8, sectors u8), blk_size,
# topology (physical_block_exp u8, alignment_offset u8, min_io_size u16, opt_io_size u32),
# writeback u8, unused u8, num_queues u16, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap u8, 3 unused, max_secure_erase_sectors, max_secure_erase_seg,
# secure_erase_sector_alignment.
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3xIII")
assert CONFIG.size == 72

_unpack_header = HEADER.unpack_from


class _Refused(Exception):
    """A request broke a rule: complete it with `status` and nothing else written.

    Raised as a class, so each raise is a fresh instance: a reused one would keep growing
    its traceback.
    """

    status = VIRTIO_BLK_S_IOERR


class _IOERR(_Refused):
    status = VIRTIO_BLK_S_IOERR


class _UNSUPP(_Refused):
    status = VIRTIO_BLK_S_UNSUPP


class BlockCore:
    """virtio-blk over a `Disk` (sandvmm/devices/block/disk.py).

    `read_only`: None follows the disk; True refuses writes to a writable disk (F_RO is
    offered either way). `discard`: offer DISCARD and let WRITE_ZEROES deallocate (crosvm's
    `sparse`). A read-only device offers neither DISCARD nor WRITE_ZEROES, and refuses them
    (IOERR, like writes) if a driver sends them anyway. `slice_bytes`: data one process()
    call moves before it returns (None: it completes every available request).
    """

    name = "block"
    device_type = VIRTIO_ID_BLOCK

    def __init__(self, disk, *, serial: str = "", read_only: bool | None = None, queue_size: int = 256,
                 discard: bool = True, physical_block_size: int = DEFAULT_PHYSICAL_BLOCK_SIZE,
                 slice_bytes: int | None = SLICE_BYTES):
        if read_only is None:
            read_only = bool(disk.read_only)
        elif not read_only and disk.read_only:
            raise ValueError("a read-only disk cannot back a writable virtio-blk device")
        if not (4 <= queue_size <= 32768 and queue_size & (queue_size - 1) == 0):
            raise ValueError(f"queue size {queue_size} is not a power of two from 4 to 32768")
        serial_bytes = serial.encode()
        if len(serial_bytes) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        physical_exponent = (physical_block_size // LOGICAL_BLOCK_SIZE).bit_length() - 1
        if physical_block_size < LOGICAL_BLOCK_SIZE or LOGICAL_BLOCK_SIZE << physical_exponent != physical_block_size:
            raise ValueError(f"physical block size {physical_block_size} is not 512 times a power of two")
        self.disk = disk
        self.read_only = read_only
        self.capacity = disk.size >> SECTOR_SHIFT  # a partial last sector is not addressable
        self.serial = serial_bytes.ljust(ID_BYTES, b"\0")
        self.queue_max_sizes = (queue_size,)
        self.seg_max = queue_size - 2  # the queue core caps a chain at the queue size; header and status take 2
        self.discard = discard and not read_only
        features = (RING_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_SIZE_MAX
                    | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_TOPOLOGY)
        if read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
            if self.discard:
                features |= 1 << VIRTIO_BLK_F_DISCARD
        self.features = features
        min_io_blocks = physical_block_size // LOGICAL_BLOCK_SIZE
        self._config = CONFIG.pack(
            self.capacity, SIZE_MAX, self.seg_max, 0, 0, 0, LOGICAL_BLOCK_SIZE,
            physical_exponent, 0, min_io_blocks, 0,
            0,  # writeback: only meaningful with CONFIG_WCE, which is not offered (FLUSH implies writeback)
            1,  # num_queues: one (MQ is not offered)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS, int(self.discard),
            0, 0, 0)
        self.queue: SplitQueue | None = None
        self.slice_bytes = slice_bytes
        self._slice_left = 0
        self._discard_negotiated = self._write_zeroes_negotiated = False

    # ---- the transport's side --------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        return self._config[offset:offset + size].ljust(size, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # nothing writable: CONFIG_WCE (the writeback byte) is not offered

    def activate(self, features: int, queues: dict[int, SplitQueue]) -> None:
        self.queue = queues.get(REQUEST_QUEUE)
        self._discard_negotiated = bool(features >> VIRTIO_BLK_F_DISCARD & 1)
        self._write_zeroes_negotiated = bool(features >> VIRTIO_BLK_F_WRITE_ZEROES & 1)

    def reset(self) -> None:
        self.queue = None
        self._discard_negotiated = self._write_zeroes_negotiated = False

    def process(self, queue_index: int) -> list[int]:
        if queue_index != REQUEST_QUEUE or self.queue is None:
            return []
        more = None
        if self.slice_bytes is not None:
            self._slice_left = self.slice_bytes
            more = self._slice_unfinished
        return [REQUEST_QUEUE] if self.queue.serve(self._complete, more=more, handle_three=self._complete_three) else []

    def _slice_unfinished(self) -> bool:
        return self._slice_left > 0

    # ---- one request -----------------------------------------------------------------------

    def _complete_three(self, header: memoryview, data: memoryview, data_is_writable: bool,
                        status: memoryview) -> int | None:
        """A read or write of one buffer, whole header first and status byte last (every 4 KiB
        request Linux sends), completed without a Chain; None leaves anything else to
        `_complete`. Returns the used length."""
        if len(header) != HEADER_SIZE or len(status) != 1:
            return None
        request_type, sector = _unpack_header(header)
        if request_type == VIRTIO_BLK_T_IN and data_is_writable:
            length = len(data)
            status[0] = result = self._read(sector, [data], length)
            return 1 if result else length + 1
        if request_type == VIRTIO_BLK_T_OUT and not data_is_writable:
            status[0] = self._write(sector, [data], len(data))
            return 1
        return None

    def _complete(self, chain: Chain) -> int:
        """Execute one request and write its status; returns the used length."""
        writable_length = chain.writable_length
        if not writable_length:
            return 0  # no status byte: the driver could not learn any outcome, so do nothing
        writable = chain.writable
        status_buffer = writable[-1]
        if not len(status_buffer):  # zero-length descriptors after the real last byte
            status_buffer = next(view for view in reversed(writable) if len(view))
        try:
            written = self._execute(chain, writable_length - 1)
            status = VIRTIO_BLK_S_OK
        except _Refused as refusal:
            written, status = 0, refusal.status
        except (DiskError, OSError):  # the disk wraps host errors in DiskError; an OSError is one too
            written, status = 0, VIRTIO_BLK_S_IOERR
        status_buffer[-1] = status
        # An error reports the status byte alone; data a failed read left behind is the
        # spec's "MAY write more than len".
        return written + 1

    def _execute(self, chain: Chain, data_in: int) -> int:
        """Run a request whose writable part has `data_in` bytes before the status byte.

        Returns the data bytes written into the guest's buffers; raises _Refused.
        """
        readable = chain.readable
        if readable and len(readable[0]) >= HEADER_SIZE:  # the usual layout: header first, whole
            request_type, sector = _unpack_header(readable[0])
        else:
            header = chain.read(HEADER_SIZE)  # gathered across descriptors
            if len(header) < HEADER_SIZE:
                raise _IOERR
            request_type, sector = _unpack_header(header)
        data_out = chain.readable_length - HEADER_SIZE

        if request_type == VIRTIO_BLK_T_IN:
            if data_out:
                raise _IOERR
            writable = chain.writable
            if len(writable[-1]) == 1:  # Linux's layout: the status byte has its own buffer
                views = writable[:-1]
            else:
                views = chain.writable_views(0, data_in)
            if self._read(sector, views, data_in):
                raise _IOERR
            return data_in

        if request_type == VIRTIO_BLK_T_OUT:
            if data_in:
                raise _IOERR
            if len(readable[0]) == HEADER_SIZE:  # Linux's layout: the header has its own buffer
                views = readable[1:]
            else:
                views = chain.readable_views(HEADER_SIZE, data_out)
            if self._write(sector, views, data_out):
                raise _IOERR
            return 0

        if request_type == VIRTIO_BLK_T_FLUSH:
            self.disk.flush()  # any data buffers mean nothing to a flush: ignored
            return 0

        if request_type == VIRTIO_BLK_T_GET_ID:
            if data_out:
                raise _IOERR
            # A driver offering less than 20 bytes gets the prefix that fits (as QEMU does).
            return chain.write(self.serial[:min(ID_BYTES, data_in)])

        if request_type == VIRTIO_BLK_T_DISCARD or request_type == VIRTIO_BLK_T_WRITE_ZEROES:
            self._discard_or_write_zeroes(chain, request_type == VIRTIO_BLK_T_DISCARD, data_in, data_out)
            return 0

        raise _UNSUPP  # GET_LIFETIME, SECURE_ERASE, zoned commands, anything else

    # Reads and writes check their range inline (the data path), as _check_range does, and
    # return their status rather than raise: the data path's handler has no try.

    def _read(self, sector: int, views: list[memoryview], length: int) -> int:
        """Read `length` bytes from `sector` into `views`, which hold exactly that many."""
        if length & (SECTOR_SIZE - 1) or length >> SECTOR_SHIFT > self.capacity - sector:
            return VIRTIO_BLK_S_IOERR
        self._slice_left -= length
        if length:
            try:
                self.disk.read_into(sector << SECTOR_SHIFT, views)
            except (DiskError, OSError):  # the disk wraps host errors in DiskError; an OSError is one too
                return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _write(self, sector: int, views: list[memoryview], length: int) -> int:
        """Write the `length` bytes in `views` at `sector`."""
        if self.read_only or length & (SECTOR_SIZE - 1) or length >> SECTOR_SHIFT > self.capacity - sector:
            return VIRTIO_BLK_S_IOERR
        self._slice_left -= length
        if length:
            try:
                self.disk.write_from(sector << SECTOR_SHIFT, views)
            except (DiskError, OSError):
                return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _check_range(self, sector: int, count: int) -> None:
        # sector + count may pass 2^64, where C would wrap; Python's integers do not, and
        # comparing the count with what is left also refuses any sector past the end
        # (the difference is then negative).
        if count > self.capacity - sector:
            raise _IOERR

    def _discard_or_write_zeroes(self, chain: Chain, is_discard: bool, data_in: int, data_out: int) -> None:
        if self.read_only:
            raise _IOERR
        if not (self._discard_negotiated if is_discard else self._write_zeroes_negotiated):
            raise _UNSUPP
        max_segments = MAX_DISCARD_SEGMENTS if is_discard else MAX_WRITE_ZEROES_SEGMENTS
        max_sectors = MAX_DISCARD_SECTORS if is_discard else MAX_WRITE_ZEROES_SECTORS
        if data_in or data_out <= 0 or data_out % SEGMENT.size or data_out // SEGMENT.size > max_segments:
            raise _IOERR
        # At most 32 segments of 16 bytes: copying them out reads each guest byte once.
        segments = list(SEGMENT.iter_unpack(chain.read(data_out, HEADER_SIZE)))
        for sector, count, flags in segments:  # all of them checked before any is executed
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (is_discard and flags):
                raise _UNSUPP  # the spec's rule for unknown flags, and for unmap on a discard
            if count > max_sectors:
                raise _IOERR
            self._check_range(sector, count)
        disk = self.disk
        for sector, count, flags in segments:
            if not count:
                continue
            if is_discard:
                disk.discard(sector << SECTOR_SHIFT, count << SECTOR_SHIFT)
            else:
                # Deallocate only where the user allowed it (write_zeroes_may_unmap says so).
                unmap = bool(flags) and self.discard
                disk.write_zeroes(sector << SECTOR_SHIFT, count << SECTOR_SHIFT, unmap)
