"""Opening a disk image and its backing chain, in main (the device child cannot open files).

The top image opens read-write unless read-only is asked; backing files always open
read-only, relative names resolving against the directory of the image that names them
(as QEMU does). Every file is locked the way QEMU locks images, so sandvmm and QEMU keep
each other out as well as two sandvmm VMs do (see docs/devices/block-images.md):

  byte 100 + p   read lock: "I use permission p"
  byte 200 + p   read lock: "nobody else may have permission p"

with p = 0 consistent read, 1 write, 3 resize. A writer holds 0, 1, 3 and refuses others
1 and 3; a reader holds 0 and refuses others 1. After taking its locks, an opener checks
that nobody refuses what it holds and nobody holds what it refuses. The locks belong to
the open file description, so they stay held while the device child keeps its fds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from sandvmm.devices.block.disk import Disk, DiskError, FileIO, ImageError, RawDisk
from sandvmm.devices.block.qcow2 import Qcow2Disk
from sandvmm.devices.block.qcow2_format import is_qcow2, parse_header

MAX_CHAIN_DEPTH = 64
FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE = 0, 1, 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write", PERM_RESIZE: "resize"}
USE_BASE, REFUSE_BASE = 100, 200
WRITER = ({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE}, {PERM_WRITE, PERM_RESIZE})  # (used, refused)
READER = ({PERM_CONSISTENT_READ}, {PERM_WRITE})


def open_image(path: Path, *, read_only: bool, lock: bool = True, direct: bool = False) -> Disk:
    """The image at `path` with its backing chain, ready for I/O; ImageError if not."""
    disk, _ = open_chain(path, read_only, lock=lock, direct=direct)
    return disk


def open_chain(path: Path, read_only: bool, *, lock: bool = True, direct: bool = False) -> tuple[Disk, list[int]]:
    """(disk, every fd it uses), top image first.

    direct: O_DIRECT on every file of the chain, plus a second, buffered fd per file for
    the transfers O_DIRECT cannot do (unaligned ones: see FileIO).
    """
    layers: list[tuple[Path, int, str, int | None]] = []  # (path, fd, format, buffered twin fd)
    seen: dict[tuple[int, int], Path] = {}
    try:
        current, writable, forced = Path(path), not read_only, None
        while True:
            if len(layers) >= MAX_CHAIN_DEPTH:
                raise ImageError(f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
            fd = _open(current, writable, direct, layers[-1][0] if layers else None)
            layers.append((current, fd, "unknown", None))
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) in seen:
                names = " -> ".join(str(layer[0]) for layer in layers)
                raise ImageError(f"backing file loop: {names}")
            seen[(info.st_dev, info.st_ino)] = current
            if lock:
                take_lock(fd, writable, current)
            if direct:
                layers[-1] = (current, fd, "unknown", _open(current, writable, False, None))
            head = _read_head(fd, current, layers[-1][3])
            qcow2 = is_qcow2(head) if forced is None else forced == "qcow2"
            if forced == "qcow2" and not is_qcow2(head):
                raise ImageError(f"{current} is named as a qcow2 backing file but is not qcow2")
            layers[-1] = (current, fd, "qcow2" if qcow2 else "raw", layers[-1][3])
            if not qcow2:
                break
            header = parse_header(head, str(current))
            if header.backing_file is None:
                break
            current, writable, forced = _backing_path(current, header.backing_file), False, header.backing_format
            if forced not in (None, "raw", "qcow2"):
                raise ImageError(f"{layers[-1][0]}: backing format {forced!r} is not supported (raw or qcow2)")
        disk = _build(layers, read_only)
        return disk, image_fds(disk)
    except BaseException:
        for layer in layers:
            for fd in layer[1], layer[3]:
                if fd is not None:
                    os.close(fd)
        raise


def _build(layers: list[tuple[Path, int, str, int | None]], read_only: bool) -> Disk:
    """Disks from the bottom of the chain up; on failure the fds are the caller's to close."""
    disk: Disk | None = None
    for position in range(len(layers) - 1, -1, -1):
        path, fd, kind, buffered_fd = layers[position]
        layer_read_only = read_only or position > 0
        if kind == "qcow2":
            disk = Qcow2Disk(fd, disk, layer_read_only, name=str(path), buffered_fd=buffered_fd)
        else:  # only the top can be written, and its format is always probed
            disk = RawDisk(fd, layer_read_only, name=str(path), guard_format=position == 0, buffered_fd=buffered_fd)
    return disk


def _open(path: Path, writable: bool, direct: bool, named_by: Path | None) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        what = f"backing file {path} of {named_by}" if named_by else f"image {path}"
        hints = {errno.ENOENT: "not found", errno.EROFS: "is on a read-only file system (open it read-only)",
                 errno.EACCES: "permission denied", errno.EISDIR: "is a directory",
                 errno.EINVAL: "cannot be opened with O_DIRECT on this file system" if direct else "invalid"}
        raise ImageError(f"{what}: {hints.get(error.errno, os.strerror(error.errno))}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ImageError(f"{path} is neither a regular file nor a block device")
    return fd


def _read_head(fd: int, path: Path, buffered_fd: int | None) -> bytes:
    """The first cluster's worth of bytes (the largest cluster is 2 MiB; read what the header says)."""
    io = FileIO(fd, name=str(path), buffered_fd=buffered_fd)
    try:
        head = bytes(io.read(0, 512))
        if is_qcow2(head):
            cluster_bits = min(max(struct.unpack_from(">I", head, 20)[0], 9), 21)
            head = bytes(io.read(0, 1 << cluster_bits))
    except DiskError as error:
        raise ImageError(str(error)) from None
    return head


def _backing_path(image: Path, name: str) -> Path:
    if name.startswith("json:") or ("://" in name and not name.startswith("file://")):
        raise ImageError(f"{image}: backing file {name!r} is not a plain path (not supported)")
    name = name.removeprefix("file:")
    backing = Path(name)
    return backing if backing.is_absolute() else image.parent / backing


def flock_byte(fd: int, command: int, kind: int, byte: int) -> tuple:
    return FLOCK.unpack(fcntl.fcntl(fd, command, FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)))


def take_lock(fd: int, writable: bool, path: Path) -> None:
    """Lock an open image as a writer or a reader; ImageError when someone is in the way."""
    used, refused = WRITER if writable else READER
    busy = f"image {path} is in use by another process (locked)"
    try:
        for byte in [USE_BASE + perm for perm in used] + [REFUSE_BASE + perm for perm in refused]:
            flock_byte(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        for perm in used:
            if flock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, REFUSE_BASE + perm)[0] != fcntl.F_UNLCK:
                raise ImageError(f"{busy}: another user refuses to share {PERM_NAMES[perm]}")
        for perm in refused:
            if flock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, USE_BASE + perm)[0] != fcntl.F_UNLCK:
                raise ImageError(f"{busy}: another user has it open for {PERM_NAMES[perm]}")
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageError(busy) from None
        raise ImageError(f"{path}: cannot lock ({os.strerror(error.errno)})") from None


def chain_files(disk: Disk) -> list[FileIO]:
    """The files of `disk` and its backing chain, top first."""
    files = []
    while disk is not None:
        files.append(disk.io)
        disk = getattr(disk, "backing", None)
    return files


def image_fds(disk: Disk) -> list[int]:
    """The fds a jailed device child must keep for `disk` and its backing chain, top first."""
    return [fd for file in chain_files(disk) for fd in file.fds()]
