"""A newc ("070701") cpio writer: the initramfs format the Linux kernel unpacks.

Pure and deterministic (mtime 0, our own inode numbers), so the same inputs give the same
image bytes. Left uncompressed: the kernel then only copies, and the memory the unpacked
files use in the guest is the same either way.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.inode = 0
        self.written: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/") or "."
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        encoded = header + name.encode() + b"\0"
        self.out.write(encoded + b"\0" * (-len(encoded) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))
        self.written.add(name)

    def directory(self, name: str, mode: int = 0o755) -> None:
        if name.lstrip("/") not in self.written:
            self._entry(name, stat.S_IFDIR | mode)

    def makedirs(self, path: str) -> None:
        parts = [part for part in path.strip("/").split("/") if part]
        for depth in range(1, len(parts) + 1):
            self.directory("/".join(parts[:depth]))

    def parents(self, name: str) -> None:
        self.makedirs(os.path.dirname(name.strip("/")))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def tree(self, root: str, skip: tuple[str, ...] = ()) -> None:
        """Add everything below a host directory, as it would appear at the guest's /."""
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            dirnames[:] = sorted(d for d in dirnames if not (rel + "/" + d).lstrip("./").startswith(skip))
            for name in sorted(dirnames) + sorted(filenames):
                host = os.path.join(dirpath, name)
                guest = os.path.normpath(os.path.join(rel, name))
                info = os.lstat(host)
                if stat.S_ISLNK(info.st_mode):
                    self.symlink(guest, os.readlink(host))
                elif stat.S_ISDIR(info.st_mode):
                    self.parents(guest)
                    self.directory(guest, stat.S_IMODE(info.st_mode))
                elif stat.S_ISREG(info.st_mode):
                    with open(host, "rb") as f:
                        self.file(guest, f.read(), stat.S_IMODE(info.st_mode))

    def close(self) -> None:
        self._entry(TRAILER, 0)
