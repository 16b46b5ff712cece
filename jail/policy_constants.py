"""Named constants that policy files may use, with their x86_64 Linux values.

Values come from Python's own modules wherever Python exposes them (so they are the
values of the C library Python was built against); the few that Python lacks are
copied from the kernel's uapi headers, named in the comment of each group.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import termios
import time
from types import ModuleType

# (module, name prefixes or exact names) — only groups that syscall arguments take.
_FROM_PYTHON: tuple[tuple[ModuleType, tuple[str, ...]], ...] = (
    (os, ("O_", "EFD_", "GRND_", "MFD_", "SEEK_")),
    (mmap, ("PROT_", "MAP_", "MADV_")),
    (fcntl, ("F_", "FD_CLOEXEC")),
    (socket, ("AF_UNIX", "AF_INET", "AF_INET6", "SOCK_", "MSG_", "SOL_SOCKET", "SCM_RIGHTS",
              "SCM_CREDENTIALS", "SO_", "SHUT_", "IPPROTO_TCP", "TCP_NODELAY")),
    (time, ("CLOCK_",)),
    (termios, ("FIONBIO", "FIONREAD", "FIOCLEX", "FIONCLEX", "TCGETS", "TIOCGWINSZ")),
    (select, ("EPOLL",)),
    (signal, ("SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK")),
)

_FUTEX_PRIVATE_FLAG = 128
_FUTEX_OPS = {  # linux/futex.h
    "FUTEX_WAIT": 0, "FUTEX_WAKE": 1, "FUTEX_FD": 2, "FUTEX_REQUEUE": 3,
    "FUTEX_CMP_REQUEUE": 4, "FUTEX_WAKE_OP": 5, "FUTEX_LOCK_PI": 6, "FUTEX_UNLOCK_PI": 7,
    "FUTEX_TRYLOCK_PI": 8, "FUTEX_WAIT_BITSET": 9, "FUTEX_WAKE_BITSET": 10,
    "FUTEX_WAIT_REQUEUE_PI": 11, "FUTEX_CMP_REQUEUE_PI": 12, "FUTEX_LOCK_PI2": 13,
}

_FROM_KERNEL_HEADERS: dict[str, int] = {
    **_FUTEX_OPS,
    **{f"{name}_PRIVATE": value | _FUTEX_PRIVATE_FLAG for name, value in _FUTEX_OPS.items()
       if name != "FUTEX_FD"},
    "FUTEX_PRIVATE_FLAG": _FUTEX_PRIVATE_FLAG,
    "FUTEX_CLOCK_REALTIME": 256,
    # linux/eventpoll.h
    "EPOLL_CTL_ADD": 1, "EPOLL_CTL_DEL": 2, "EPOLL_CTL_MOD": 3,
    # asm-generic/mman.h, asm-generic/mman-common.h, linux/mman.h
    "MAP_SHARED_VALIDATE": 0x03, "MAP_FIXED": 0x10, "MAP_GROWSDOWN": 0x0100,
    "MAP_LOCKED": 0x2000, "MAP_NORESERVE": 0x4000, "MAP_NONBLOCK": 0x010000,
    "MAP_HUGETLB": 0x040000, "MAP_SYNC": 0x080000, "MAP_FIXED_NOREPLACE": 0x100000,
    "MREMAP_MAYMOVE": 1, "MREMAP_FIXED": 2, "MREMAP_DONTUNMAP": 4,
    # linux/fcntl.h (flags of the *at() calls)
    "AT_SYMLINK_NOFOLLOW": 0x100, "AT_REMOVEDIR": 0x200, "AT_EMPTY_PATH": 0x1000,
    # linux/sched.h (clone flags: a device's threads)
    "CLONE_VM": 0x100, "CLONE_FS": 0x200, "CLONE_FILES": 0x400, "CLONE_SIGHAND": 0x800,
    "CLONE_THREAD": 0x10000, "CLONE_SYSVSEM": 0x40000, "CLONE_SETTLS": 0x80000,
    "CLONE_PARENT_SETTID": 0x100000, "CLONE_CHILD_CLEARTID": 0x200000,
    "MAP_STACK": 0x20000,
    # linux/prctl.h (what a device may still call after the jail is set up)
    "PR_SET_NAME": 15, "PR_GET_NAME": 16,
}


def _python_constants() -> dict[str, int]:
    found: dict[str, int] = {}
    for module, prefixes in _FROM_PYTHON:
        for name in dir(module):
            value = getattr(module, name)
            if name.startswith(prefixes) and isinstance(value, int) and value >= 0:
                found[name] = int(value)
    return found


def _build_table() -> dict[str, int]:
    table = _python_constants()
    for name, value in _FROM_KERNEL_HEADERS.items():
        # A Python that grows one of these must agree with the header value.
        if table.setdefault(name, value) != value:
            raise AssertionError(f"{name}: Python says {table[name]}, the kernel header {value}")
    return table


#: Every name a policy expression may use, mapped to its value.
POLICY_CONSTANTS: dict[str, int] = _build_table()

#: Errno names for `return ERRNO` rules (EPERM, ENOSYS, EWOULDBLOCK, ...).
ERRNO_NUMBERS: dict[str, int] = {name: value for name, value in vars(errno).items()
                                 if name.startswith("E") and isinstance(value, int)}
