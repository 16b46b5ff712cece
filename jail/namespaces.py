"""Namespaces of the jailed child: clone flags, user namespace id maps, and diagnostics."""

from __future__ import annotations

import errno
import os

from jail import linux

#: Every jailed child gets these; CLONE_NEWUSER is added whenever it is possible.
NAMESPACES = (linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET
              | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
NAMESPACE_NAMES = ("mnt", "pid", "net", "ipc", "uts", "user")

# clone(2) errors that mean "no user namespace for you" rather than a bug.
USERNS_REFUSALS = (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS, errno.EINVAL)


def write_id_map(pid: int | str, inside_uid: int, outside_uid: int, inside_gid: int,
                 outside_gid: int, *, deny_setgroups: bool) -> None:
    """Map one uid and one gid of a new user namespace (each file takes a single write).

    Without CAP_SETGID in the parent namespace the kernel only accepts a gid_map once
    setgroups(2) is denied in the new namespace (user_namespaces(7)).
    """
    proc = f"/proc/{pid}"
    if deny_setgroups:
        _write_once(f"{proc}/setgroups", "deny")
    _write_once(f"{proc}/uid_map", f"{inside_uid} {outside_uid} 1\n")
    _write_once(f"{proc}/gid_map", f"{inside_gid} {outside_gid} 1\n")


def _write_once(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def user_namespace_hint(privileged: bool) -> str:
    """Why this host probably refuses a new user namespace, read from its sysctls."""
    reasons = []
    if _sysctl("user/max_user_namespaces") == "0":
        reasons.append("user.max_user_namespaces is 0")
    if not privileged:
        if _sysctl("kernel/unprivileged_userns_clone") == "0":
            reasons.append("kernel.unprivileged_userns_clone is 0")
        if _sysctl("kernel/apparmor_restrict_unprivileged_userns") == "1":
            reasons.append("kernel.apparmor_restrict_unprivileged_userns is 1")
    if reasons:
        return "; ".join(reasons)
    return ("is kernel.unprivileged_userns_clone 0, or does a container's seccomp "
            "filter or a chroot forbid it?")


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None
