"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

Constants are from the kernel's uapi headers (x86_64). Every wrapper raises OSError
with the errno and the call's name, so the child can report a one-line reason.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)
# PyDLL keeps the GIL held across the call, as os.fork() does around fork().
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long

# x86_64 syscall numbers (asm/unistd_64.h)
SYS_CLONE = 56
SYS_CAPSET = 126
SYS_PIVOT_ROOT = 155
SYS_MOUNT_SETATTR = 442
SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1

# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_PARENT = 0x00008000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# linux/mount.h
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_FDCWD = -100
AT_RECURSIVE = 0x8000

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# linux/capability.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _path(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def clone_process(flags: int) -> int:
    """fork(), with clone(2) flags: returns 0 in the child, the child's pid in the caller.

    clone with a NULL stack copies the caller's stack like fork does. CPython's fork
    hooks run around it (locks, os.register_at_fork callbacks), as in os.fork(). Only
    call this from a process with a single thread: in the child, CPython runs a few
    bytecodes before PyOS_AfterFork_Child, and a GIL hand-over requested by another
    thread at that moment would wait forever.
    """
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags), None, None, None,
                            None)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(errno, f"clone: {os.strerror(errno)}")
    return pid


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data)),
           f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_path(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), _path(new_root), _path(put_old)),
           f"pivot_root {new_root}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, *, recursive: bool) -> None:
    """Add MOUNT_ATTR_* flags to a mount (and, recursive, to every mount under it).

    Unlike a MS_REMOUNT, this keeps the flags it is not told about, so it works on
    mounts whose flags are locked by a more privileged mount namespace (Linux 5.12+).
    """
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD),
                         _path(path), ctypes.c_ulong(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    return _check(_libc.prctl(option, arg2, arg3, 0, 0), what)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_mode_filter(program: bytes, flags: int) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, program): the result (a listener fd with
    SECCOMP_FILTER_FLAG_NEW_LISTENER, else 0)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    return _check(_libc.syscall(ctypes.c_long(SYS_SECCOMP),
                                ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags),
                                ctypes.byref(fprog)),
                  "seccomp(SECCOMP_SET_MODE_FILTER)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def clear_capability_sets() -> None:
    """Empty this thread's effective, permitted and inheritable capability sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # zeroed: 64 capability bits in two 32-bit halves
    _check(_libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data)),
           "capset")


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether fd became readable (or hung up) within timeout seconds (None: forever).

    poll(2) rather than select(2), which cannot watch fds above 1023.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else math.ceil(max(0.0, timeout) * 1000)))


def close_fds_except(keep: frozenset[int]) -> None:
    """Close every fd not in keep (and drop Python's std streams whose fds go)."""
    # Python objects still wrapping closed std streams must not write to whatever
    # fd later reuses the number.
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if fd not in keep:
            setattr(sys, name, None)
    low = 0
    for fd in sorted(keep):
        if low < fd:  # never an empty range: closerange(0, 0) is close_range(0, ~0), every fd
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
