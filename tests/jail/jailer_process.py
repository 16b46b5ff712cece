"""A separate process that spawns one jailed child, driven over stdin/stdout.

    python3 -m tests.jail.jailer_process [--as-nobody] [--without-user-namespaces]

Tests use it for what their own process cannot be: an unprivileged caller (uid 65534),
a caller in a user namespace that may not create more of them, and a parent that dies.
Protocol: it prints `pid N`, or `error MESSAGE` if spawn() failed. Then it reads
commands: `release` (the child's blocking read returns; it prints `exit STATUS`),
`violation` (the child makes a forbidden openat; it prints `violation NAME PID` after
denying it with EACCES, then `exit STATUS`), or `die` (it exits at once, leaving the
child to the parent-death signal).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys

from jail import JailConfig, JailError, load_policy, privileges, spawn

POLICY = load_policy(os.path.join(os.path.dirname(__file__), "../../policies/x86_64/"
                                  "test_minimal.policy"))
NOBODY = 65534
CLONE_NEWUSER = 0x10000000


def become_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def enter_user_namespace_without_nested_ones() -> None:
    """Become uid 1000 of a user namespace where user.max_user_namespaces is 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    outside_uid = os.geteuid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"1000 {outside_uid} 1\n")
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0\n")
    privileges.drop_capabilities()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--as-nobody", action="store_true")
    parser.add_argument("--without-user-namespaces", action="store_true")
    options = parser.parse_args()
    if options.without_user_namespaces:
        enter_user_namespace_without_nested_ones()
    if options.as_nobody:
        become_nobody()
    read_end, write_end = os.pipe()

    def target() -> int:
        command = os.read(read_end, 1)
        if command == b"v":
            try:
                os.open("/", os.O_RDONLY)
            except PermissionError:
                return 13
            return 0
        return 42

    try:
        child = spawn(JailConfig("jailer", POLICY, "notify", keep_fds=(2, read_end)), target)
    except JailError as e:
        print(f"error {e}", flush=True)
        return 0
    print(f"pid {child.pid}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "die":
            os._exit(0)
        if command == "release":
            os.write(write_end, b"r")
        if command == "violation":
            os.write(write_end, b"v")
            violation = child.listener.receive(timeout=10)
            child.listener.deny(violation, errno.EACCES)
            print(f"violation {violation.syscall} {violation.pid}", flush=True)
        print(f"exit {child.wait(timeout=10)}", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
