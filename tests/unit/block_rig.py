"""What the virtio-blk tests drive the core with: a fake driver's rig over a fake disk."""

from __future__ import annotations

import os
import struct

from sandvmm.devices.block.core import BlockCore
from sandvmm.devices.block.disk import DiskError
from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import SplitQueue
from sandvmm.memory import MiB

DISK_SECTORS = 64
SMALL_RAM = 0x40000
# Request types and statuses as the spec numbers them (5.2.6), independently of the module.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_DISCARD, T_WRITE_ZEROES, T_SECURE_ERASE = 0, 1, 4, 8, 10, 11, 13, 14
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<I4xQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # discard/write-zeroes: sector, num_sectors, flags
UNMAP = 1


class MemoryDisk:
    """A bytearray disk that records its calls and fails the test on any access outside it."""

    def __init__(self, size: int = DISK_SECTORS * 512, *, read_only: bool = False):
        self.size = size
        self.read_only = read_only
        self.data = bytearray(os.urandom(size))
        self.calls: list[tuple] = []
        self.buffers: list[memoryview] = []  # every buffer read into or written from
        self.failure: BaseException | None = None

    def _enter(self, name: str, offset: int, length: int, *extra) -> None:
        assert 0 <= offset and 0 < length and offset + length <= self.size, f"{name} {offset}+{length}"
        assert name in ("read", "flush") or not self.read_only, f"{name} on a read-only disk"
        self.calls.append((name, offset, length, *extra))
        if self.failure is not None:
            raise self.failure

    def read_into(self, offset: int, buffers: list[memoryview]) -> None:
        self._enter("read", offset, sum(map(len, buffers)))
        self.buffers += buffers
        for buffer in buffers:
            buffer[:] = self.data[offset:offset + len(buffer)]
            offset += len(buffer)

    def write_from(self, offset: int, buffers: list[memoryview]) -> None:
        self._enter("write", offset, sum(map(len, buffers)))
        self.buffers += buffers
        for buffer in buffers:
            self.data[offset:offset + len(buffer)] = buffer
            offset += len(buffer)

    def flush(self) -> None:
        self.calls.append(("flush",))
        if self.failure is not None:
            raise self.failure

    def _zero(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.data))  # a disk claiming more than it stores
        self.data[offset:end] = bytes(max(0, end - offset))

    def discard(self, offset: int, length: int) -> None:
        self._enter("discard", offset, length)
        self._zero(offset, length)  # like a punched hole

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._enter("write_zeroes", offset, length, unmap)
        self._zero(offset, length)


class FileDisk:
    """What the real raw disk does, in miniature: preadv/pwritev on a host file."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = False

    def read_into(self, offset, buffers):
        if os.preadv(self.fd, buffers, offset) != sum(map(len, buffers)):
            raise DiskError("short read")

    def write_from(self, offset, buffers):
        if os.pwritev(self.fd, buffers, offset) != sum(map(len, buffers)):
            raise DiskError("short write")

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        raise DiskError("not used here")

    write_zeroes = discard


class Rig:
    """A driver, a queue and a core over one disk, with the negotiated features given."""

    def __init__(self, memory, disk=None, *, features: int | None = None, size: int = 64, data_size: int = 4 * MiB,
                 event_idx: bool = False, **options):
        self.memory = memory
        self.disk = MemoryDisk() if disk is None else disk
        self.driver = FakeDriver(memory, size=size, address=0x10000, data_size=data_size, event_idx=event_idx)
        self.queue = SplitQueue(memory, self.driver.config, event_idx=event_idx, indirect=True)
        self.core = BlockCore(self.disk, **options)
        self.core.activate(self.core.features if features is None else features, {0: self.queue})

    def submit(self, request_type: int, sector: int = 0, data: bytes = b"", writable=(1,), **options) -> int:
        readable = [HEADER.pack(request_type, sector)] + ([data] if data else [])
        return self.driver.add_chain(readable=readable, writable=writable, **options)

    def run(self) -> list[tuple[int, int]]:
        while self.core.process(0):  # as the device's loop does: a slice at a time
            pass
        return self.driver.used()

    def one(self, *args, **options) -> tuple[int, bytes]:
        """Submit one request and run it: (status, data written before the status byte)."""
        head = self.submit(*args, **options)
        ((used_head, length),) = self.run()
        assert used_head == head
        written = self.driver.written_data(head)
        assert 1 <= length <= len(written)
        return written[-1], written[:length - 1]

    def read(self, sector: int, count: int = 1) -> bytes:
        status, data = self.one(T_IN, sector, writable=[count * 512, 1])
        assert status == S_OK
        return data


def segments(*entries) -> bytes:
    return b"".join(SEGMENT.pack(*entry) for entry in entries)


def header_only(request_type, sector=0):
    return [HEADER.pack(request_type, sector)]
