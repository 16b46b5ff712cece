"""What a virtio-blk backend reads and writes: the Disk interface, positional I/O on an fd
(FileIO), and RawDisk, a raw image file or block device.

Every Disk works on fds opened by main (images.py): the jailed device child has no
open/openat. A Disk holds only fds and plain state, so it keeps working in a forked child.
Disks are not thread-safe: one call at a time.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import operator
import os
import stat
import threading
from functools import partial
from typing import Callable, Protocol, Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX")
DIRECT_ALIGNMENT = 4096  # O_DIRECT wants the logical block size; 4 KiB covers 512 B and 4Kn devices
ZEROS = bytes(2 << 20)  # as large as the largest qcow2 cluster
QCOW2_MAGIC = b"QFI\xfb"

# A write this large is cut into one part per thread, about equal and page-aligned, which
# the calling thread and the helper threads take as each comes free, where the device has
# helpers (main gives them where it has more than one CPU). A write into the host's page
# cache is kernel work (finding, copying and dirtying each page) that runs well on several
# CPUs: 1 MiB writes went from 0.5 to 0.85 of QEMU's throughput in a 2-vCPU lab, and to
# 1.06 (a median over seven labs) once a helper that woke late no longer held the caller up.
# Reads are not split: a read is one copy, which one thread does at some 2 GB/s there, and
# handing half of it to a thread cost more than it saved (1 MiB reads 1.2 -> 0.6 of QEMU's).
SPLIT_BYTES = 512 << 10
PAGE_SIZE = 4096

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class DiskError(Exception):
    """A host I/O error, or a corrupt image found at run time: the request fails with IOERR."""


class ImageError(Exception):
    """An image that cannot be opened as asked (one line, naming the file)."""


class Disk(Protocol):
    size: int  # virtual size in bytes
    read_only: bool

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...
    def close(self) -> None: ...


_nbytes = operator.attrgetter("nbytes")


def total_length(views: Sequence[memoryview]) -> int:
    return views[0].nbytes if len(views) == 1 else sum(map(_nbytes, views))  # one view: the usual read


def fill_zeros(views: Sequence[memoryview]) -> None:
    for view in views:
        for start in range(0, view.nbytes, len(ZEROS)):
            chunk = view[start:start + len(ZEROS)]
            chunk[:] = ZEROS[:chunk.nbytes]


def cut(views: list[memoryview], count: int) -> tuple[list[memoryview], list[memoryview]]:
    """The views of the first `count` bytes, and of the rest (counting in bytes: give byte views)."""
    index = 0
    while count and index < len(views):
        length = views[index].nbytes
        if count < length:
            return [*views[:index], views[index][:count]], [views[index][count:], *views[index + 1:]]
        count -= length
        index += 1
    return views[:index], views[index:]


def advance(views: list[memoryview], count: int) -> list[memoryview]:
    """The views left after skipping the first `count` bytes."""
    return cut(views, count)[1]


def byte_views(buffers: Sequence) -> list[memoryview]:
    """Flat unsigned-byte views, which is what slicing by byte offsets needs."""
    return [memoryview(buffer).cast("B") for buffer in buffers]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def address_of(view: memoryview) -> int:
    """Where a buffer's memory is, read-only ones too (a guest's write requests are
    read-only views of guest RAM; ctypes' from_buffer only takes writable ones)."""
    buffer = _PyBuffer()
    _get_buffer(view, ctypes.byref(buffer), 0)  # PyBUF_SIMPLE: contiguous bytes
    try:
        return buffer.buf or 0
    finally:
        _release_buffer(ctypes.byref(buffer))


def _aligned(view: memoryview) -> bool:
    if view.nbytes % DIRECT_ALIGNMENT:
        return False
    return not view.nbytes or address_of(view) % DIRECT_ALIGNMENT == 0


class _Transfer:
    """One large write's parts, each taken by whichever thread is free first: a helper that
    wakes late then leaves its parts to the caller instead of making it wait."""

    def __init__(self, parts: Sequence[Callable[[], None]]) -> None:
        self.parts = parts
        # next() on a count is one C call, so under the GIL no two threads get one number.
        self._take = itertools.count().__next__
        self._finish = itertools.count(1).__next__
        self.all_finished = threading.Lock()  # released by a helper that finishes the last part
        self.all_finished.acquire()
        self.error: Exception | None = None

    def work(self) -> bool:
        """Run parts until none is left to take; True if this thread finished the last one."""
        finished_last = False
        while (index := self._take()) < len(self.parts):
            try:
                self.parts[index]()
            except Exception as raised:
                self.error = self.error or raised
            finished_last = self._finish() == len(self.parts)
        return finished_last


class TransferHelpers:
    """Threads that write parts of a large write beside the thread that asked for it.

    They start at the first large write, in the device child after it is jailed: a
    thread made earlier would keep the capabilities and lack the seccomp filter that the
    jail gives the thread it runs in. A bare lock per helper wakes it: a thread pool's
    futures and condition variables cost more Python per write than the lab could spare.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._wakes: list[threading.Lock] = []  # held while the helper has nothing new to look at
        self._current: _Transfer | None = None

    def _start(self) -> None:
        for number in range(self.threads):
            wake = threading.Lock()
            wake.acquire()
            self._wakes.append(wake)
            threading.Thread(target=self._serve, args=(wake,), name=f"sandvmm-transfer-{number}", daemon=True).start()

    def _serve(self, wake: threading.Lock) -> None:
        while True:
            wake.acquire()
            transfer = self._current  # the newest, if this helper woke late for an older one
            if transfer.work():
                transfer.all_finished.release()

    def run(self, parts: Sequence[Callable[[], None]]) -> None:
        """Run every part, this thread taking its share; return when all are done (the
        guest's buffers must not be written after the request completes), raising the
        first error."""
        if not self._wakes:
            self._start()
        transfer = self._current = _Transfer(parts)
        for wake in self._wakes:
            if wake.locked():  # only this thread releases, so no helper's wake is released twice
                wake.release()
        if not transfer.work():
            transfer.all_finished.acquire()
        if transfer.error is not None:
            raise transfer.error


class FileIO:
    """Positional I/O on one fd, straight into and out of the caller's memory.

    Short transfers continue (Python itself retries on EINTR, PEP 475); reads past the end
    of the file fill zeros, as a sparse or truncated image would read.

    buffered_fd: when fd has O_DIRECT, a second fd on the same file without it. A transfer
    whose offset, length or memory is not 4 KiB aligned goes through it instead of failing
    with EINVAL (the kernel keeps cached and direct I/O on one file coherent). A twin fd
    rather than toggling O_DIRECT with F_SETFL: the jailed child's policy needs no fcntl.
    """

    def __init__(self, fd: int, *, name: str = "", buffered_fd: int | None = None) -> None:
        self.fd = fd
        self.buffered_fd = buffered_fd
        self.name = name or f"fd {fd}"
        self.unsynced = False  # written since the last sync()
        self.helpers: TransferHelpers | None = None  # for writes of SPLIT_BYTES and more

    def _error(self, what: str, error: OSError) -> DiskError:
        return DiskError(f"{self.name}: {what} failed: {os.strerror(error.errno) if error.errno else error}")

    def _fd_for(self, offset: int, views: Sequence[memoryview]) -> int:
        if self.buffered_fd is not None and (offset % DIRECT_ALIGNMENT or not all(map(_aligned, views))):
            return self.buffered_fd
        return self.fd

    def _split_write(self, fd: int, offset: int, views: Sequence[memoryview], expected: int) -> None:
        count = self.helpers.threads + 1
        part_size = -(-expected // count // PAGE_SIZE) * PAGE_SIZE  # whole pages keep O_DIRECT aligned
        parts, rest = [], byte_views(views)
        for start in range(0, expected, part_size):
            part, rest = cut(rest, part_size)
            parts.append((offset + start, part, min(part_size, expected - start)))
        self.helpers.run([partial(self._copy, os.pwritev, fd, part_offset, part, size, False)
                          for part_offset, part, size in parts])

    def _copy(self, call, fd: int, offset: int, views: Sequence[memoryview], expected: int, reading: bool) -> None:
        # The data path: one call that moves everything. The views are taken as they come
        # (any buffer format: the kernel sees bytes), so nothing is made per view here; a
        # 1 MiB guest request has up to 254 of them.
        done = 0
        if expected and len(views) <= IOV_MAX:
            done = call(fd, views, offset)
            if done == expected:
                return
        # A short transfer (end of file, a signal) or more views than one call takes: go on
        # with byte views, which can be cut where the last call stopped.
        views = [view for view in advance(byte_views(views), done) if view.nbytes]
        offset += done
        while views:
            done = call(fd, views[:IOV_MAX], offset)
            if done == 0:
                if reading:  # end of file: the rest reads as zeros
                    return fill_zeros(views)
                raise DiskError(f"{self.name}: write at {offset} made no progress")
            offset += done
            views = advance(views, done)

    def read_into(self, offset: int, views: Sequence[memoryview]) -> None:
        try:
            expected = total_length(views)
            self._copy(os.preadv, self._fd_for(offset, views), offset, views, expected, True)
        except OSError as error:
            raise self._error(f"read at {offset}", error) from None
        except OverflowError:  # an offset from a corrupt table, beyond what a file can have
            raise DiskError(f"{self.name}: read at {offset} is beyond any file's end") from None

    def write_from(self, offset: int, views: Sequence[memoryview]) -> None:
        self.unsynced = True
        try:
            fd = self._fd_for(offset, views)
            expected = total_length(views)
            if self.helpers is not None and expected >= SPLIT_BYTES:
                self._split_write(fd, offset, views, expected)
            else:
                self._copy(os.pwritev, fd, offset, views, expected, False)
        except OSError as error:
            raise self._error(f"write at {offset}", error) from None
        except OverflowError:
            raise DiskError(f"{self.name}: write at {offset} is beyond any file's end") from None

    def read(self, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        self.read_into(offset, [memoryview(data)])
        return data

    def write(self, offset: int, data) -> None:
        self.write_from(offset, [memoryview(data).cast("B")])

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            raise self._error("fdatasync", error) from None
        self.unsynced = False

    def size(self) -> int:
        try:
            info = os.fstat(self.fd)
            if stat.S_ISBLK(info.st_mode):
                return os.lseek(self.fd, 0, os.SEEK_END)
            return info.st_size
        except OSError as error:
            raise self._error("fstat", error) from None

    def fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True when done; False when this file system or file cannot (the caller writes zeros)."""
        if _libc.fallocate(self.fd, mode, offset, length) == 0:
            self.unsynced = True
            return True
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EPERM):
            return False
        raise self._error(f"fallocate at {offset}", OSError(code, os.strerror(code)))

    def write_zero_range(self, offset: int, length: int) -> None:
        while length:
            chunk = min(length, len(ZEROS))
            self.write(offset, memoryview(ZEROS)[:chunk])
            offset += chunk
            length -= chunk

    def fds(self) -> list[int]:
        return [fd for fd in (self.fd, self.buffered_fd) if fd is not None and fd >= 0]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.fd, self.buffered_fd = -1, None


class RawDisk:
    """A raw image: guest offset = file offset. `fd` is a regular file or a block device.

    guard_format: the format was guessed from the contents (no one said "raw"), so refuse
    guest writes that would put a qcow2 header at offset 0: next time the file would be
    opened as qcow2, with a backing file of the guest's choosing (any host file).
    """

    def __init__(self, fd: int, read_only: bool, *, name: str = "", guard_format: bool = False,
                 buffered_fd: int | None = None) -> None:
        self.io = FileIO(fd, name=name, buffered_fd=buffered_fd)
        # Guest offsets are file offsets: reads go straight to the file, one call less per request.
        self.read_into = self.io.read_into
        self.read_only = read_only
        self.guard_format = guard_format
        try:
            self.block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        except OSError as error:
            raise ImageError(f"{self.io.name}: {os.strerror(error.errno)}") from None
        try:
            self.size = self.io.size()
        except DiskError as error:
            raise ImageError(str(error)) from None

    @property
    def fd(self) -> int:
        return self.io.fd

    def _check_writable(self) -> None:
        if self.read_only:
            raise DiskError(f"{self.io.name} is read-only")

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check_writable()
        if self.guard_format and offset < len(QCOW2_MAGIC):
            views = byte_views(buffers)
            head = bytearray(self.io.read(0, len(QCOW2_MAGIC)))
            new = bytearray()
            for view in views:
                if len(new) >= len(QCOW2_MAGIC) - offset:
                    break
                new += view[:len(QCOW2_MAGIC)]
            new = new[:len(QCOW2_MAGIC) - offset]
            head[offset:offset + len(new)] = new
            if bytes(head) == QCOW2_MAGIC:
                raise DiskError(f"{self.io.name}: refused a write of a qcow2 header to a raw image whose"
                                " format was probed (name the format to allow it)")
        self.io.write_from(offset, buffers)

    def flush(self) -> None:
        if not self.read_only:
            self.io.sync()

    # fallocate works on block devices too (since Linux 4.9): PUNCH_HOLE discards (reading
    # back zeros), ZERO_RANGE zeroes in place. Not the BLKDISCARD/BLKZEROOUT ioctls: the
    # child's policy allows fallocate with exactly these two modes, and no ioctl.

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        if not self.io.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check_writable()
        if unmap and self.io.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self.io.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        self.io.write_zero_range(offset, min(length, max(0, self.size - offset)))

    def close(self) -> None:
        self.io.close()
