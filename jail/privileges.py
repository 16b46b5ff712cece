"""Credentials, capabilities and resource limits of the jailed child."""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import signal
import socket
from collections.abc import Mapping

from jail import linux

#: Limits every jailed child gets unless the caller says otherwise: no core dumps
#: (they would hold guest memory), and few open files.
DEFAULT_RLIMITS: Mapping[int, tuple[int, int]] = {
    resource.RLIMIT_CORE: (0, 0),
    resource.RLIMIT_NOFILE: (256, 256),
}


def last_capability() -> int:
    """The highest capability number this kernel knows (read before /proc disappears)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def apply_rlimits(limits: Mapping[int, tuple[int, int]]) -> None:
    """Lower each limit to the requested (soft, hard) values.

    A limit is never raised above the current hard limit (only privilege in the
    initial user namespace could do that), so a request above it is clamped.
    """
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        new_hard = min(_as_number(hard), _as_number(current_hard))
        new_soft = min(_as_number(soft), new_hard)
        resource.setrlimit(which, (_as_limit(new_soft), _as_limit(new_hard)))


def _as_number(limit: int) -> float:
    return math.inf if limit == resource.RLIM_INFINITY else limit


def _as_limit(number: float) -> int:
    return resource.RLIM_INFINITY if number == math.inf else int(number)


def drop_bounding_set(last_cap: int) -> None:
    """Remove every capability from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last_cap + 1):
        linux.prctl(linux.PR_CAPBSET_DROP, cap, what=f"prctl(PR_CAPBSET_DROP, {cap})")


def become(uid: int, gid: int) -> None:
    """Switch real, effective and saved ids, with no supplementary groups."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def drop_capabilities() -> None:
    """Empty the ambient, inheritable, permitted and effective sets."""
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL,
                what="prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    linux.clear_capability_sets()


M_ARENA_MAX = -8  # mallopt(3)


def one_malloc_arena() -> None:
    """Have every thread the target starts allocate from glibc's main arena: a thread's own
    arena, when it shrinks, has glibc open /proc/sys/vm/overcommit_memory, which a policy
    without open forbids (the process would die of SIGSYS in free())."""
    ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


def set_process_name(name: str) -> None:
    """What ps and /proc/PID/comm show (15 bytes at most), so a jailed child can be told apart."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    linux.prctl(linux.PR_SET_NAME, ctypes.addressof(buffer), what="prctl(PR_SET_NAME)")


def make_dumpable() -> None:
    """A non-dumpable process's /proc files belong to root, so it could not write its
    own uid_map; an unprivileged caller may be non-dumpable (e.g. after setuid)."""
    if linux.prctl(linux.PR_GET_DUMPABLE) != 1:
        linux.prctl(linux.PR_SET_DUMPABLE, 1, what="prctl(PR_SET_DUMPABLE)")


def die_with_parent(parent: socket.socket) -> None:
    """Get SIGKILL when the parent thread exits, and exit now if it already has.

    The kernel clears this setting whenever our uid/gid changes, so call it again after
    every become(). getppid() cannot tell (it is 0 in a new pid namespace); the parent's
    end of the private socket can: it is closed once the parent is gone.
    """
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, what="prctl(PR_SET_PDEATHSIG)")
    try:
        if parent.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
            os._exit(1)
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno != errno.EAGAIN:
            raise
