"""List the syscalls the representative device program makes once it is jailed.

    python3 -m tests.jail.trace_device_syscalls

It runs device_program under a policy that allows only the jail's handshake, with the
"notify" action, and answers every violation with "continue" while recording it: the
output is exactly what runs after the filter point, with the arguments that matter for
narrowing rules. This is how policies/x86_64/common_device.policy was derived.
"""

from __future__ import annotations

import collections
import threading

from jail import JailConfig, parse_policy, spawn
from tests.jail.device_program import DeviceFds, device_main, drive_device

HANDSHAKE_ONLY = parse_policy("sendmsg: 1\nclose: 1\nexit_group: 1\n")
# Arguments worth knowing per syscall (index list), to narrow the policy's rules.
INTERESTING_ARGS = {
    "fcntl": (1,), "ioctl": (1,), "mmap": (2, 3), "mprotect": (2,), "futex": (1,),
    "madvise": (2,), "socket": (0, 1), "socketpair": (0, 1), "clock_gettime": (0,),
    "epoll_create1": (0,), "epoll_ctl": (1,), "rt_sigprocmask": (0,), "getrandom": (2,),
    "recvmsg": (2,), "sendmsg": (2,), "prctl": (0,), "eventfd2": (1,),
    "setsockopt": (1, 2), "getsockopt": (1, 2), "newfstatat": (3,), "recvfrom": (3,),
    "sendto": (3,), "rt_sigaction": (0,),
}


def trace() -> dict[str, collections.Counter]:
    fds = DeviceFds.create()
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with spawn(JailConfig("trace", HANDSHAKE_ONLY, "notify", keep_fds=(2, *fds.child_fds())),
               lambda: device_main(fds)) as child:
        driver = threading.Thread(target=drive_device, args=(fds,))
        driver.start()
        while (violation := child.listener.receive(timeout=20)) is not None:
            picked = tuple(hex(violation.args[i]) for i in INTERESTING_ARGS.get(violation.syscall, ()))
            seen[violation.syscall][picked] += 1
            child.listener.allow(violation)
        driver.join()
        assert child.wait(5) == 0, child.describe_exit()
    fds.close()
    return seen


if __name__ == "__main__":
    for name, uses in sorted(trace().items()):
        print(f"{name:18} {sum(uses.values()):4}  " + "  ".join(
            f"{'/'.join(args)}×{count}" for args, count in sorted(uses.items()) if args))
