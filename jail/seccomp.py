"""Compile a Policy with libseccomp, load it, and supervise it through a listener fd.

Compiling (libseccomp, via pyseccomp) happens in the parent, before any fork: a policy
error surfaces there, and the child only has to hand finished BPF bytes to seccomp(2).
Loading calls seccomp(2) directly rather than seccomp_load(), so the flags are explicit
(TSYNC, and NEW_LISTENER + TSYNC_ESRCH for "notify") and the listener fd comes back as
the syscall's result.

The supervisor side uses the kernel's ioctls on the listener fd (linux/seccomp.h):
SECCOMP_IOCTL_NOTIF_RECV / _SEND / _ID_VALID.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import math
import os
import select
import signal
import struct
import time
from dataclasses import dataclass
from typing import Self

import pyseccomp

from jail import linux
from jail.errors import JailError, PolicyError
from jail.policy import U64_MASK, Clause, Comparison, Policy, Rule

#: Default action for a syscall the policy does not allow.
VIOLATION_ACTIONS = {
    "kill": pyseccomp.KILL_PROCESS,  # the whole process dies with SIGSYS
    "notify": pyseccomp.NOTIFY,      # the syscall waits until the supervisor decides
    "log": pyseccomp.LOG,            # allowed, and logged by the kernel (audit/kmsg)
}

# At most this many libseccomp rules from one clause's `&` tests (see _clause_args).
MAX_RULES_PER_CLAUSE = 64

_SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4  # needed with TSYNC + NEW_LISTENER (5.7+)

_OPS = {
    "==": pyseccomp.EQ, "!=": pyseccomp.NE, "<": pyseccomp.LT, "<=": pyseccomp.LE,
    ">": pyseccomp.GT, ">=": pyseccomp.GE,
}


def syscall_number(name: str) -> int | None:
    """The native (x86_64) number of a syscall, or None if libseccomp does not know it."""
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return number if number >= 0 else None  # negative: libseccomp's error / pseudo-syscall


def syscall_name(number: int, arch: int = pyseccomp.Arch.NATIVE) -> str:
    try:
        return pyseccomp.resolve_syscall(arch, number).decode()
    except ValueError:
        return f"syscall_{number}"


def check_policy(policy: Policy) -> None:
    """Raise PolicyError for what libseccomp would refuse: unknown syscall names, and
    clause shapes it cannot express."""
    for rule in policy.rules.values():
        if syscall_number(rule.syscall) is None:
            raise PolicyError(f"{rule.origin}: unknown syscall {rule.syscall!r} for x86_64 "
                              f"(libseccomp's table)")
        for clause in rule.clauses:
            _clause_args(clause, rule)


def compile_filter(policy: Policy, violation_action: str) -> pyseccomp.SyscallFilter:
    """A libseccomp filter: the policy's rules, and violation_action for everything else.

    This runs libseccomp in this process, which can loop forever on some rule sets
    (see compile_program); use it for inspection (export_pfc) of trusted policies.
    """
    _check_action(violation_action)
    check_policy(policy)
    flt = _new_filter(violation_action)
    for rule in policy.rules.values():
        _add_rule(flt, rule)
    return flt


def compile_program(policy: Policy, violation_action: str, timeout: float = 5.0) -> bytes:
    """The policy as a classic-BPF program (struct sock_filter[]) for seccomp(2).

    libseccomp 2.5.4 never returns from seccomp_rule_add() for some rule sets, e.g.
    `getpid: arg5 == 0x80 && arg4 != 1 || arg5 == 0x100000000 && arg4 != 1` (constants
    above 32 bits in one argument, a non-== test of another). So the rules are added
    in a short-lived forked process that reports each rule before adding it; a compile
    that takes longer than `timeout` seconds becomes a PolicyError naming the rule.
    """
    _check_action(violation_action)
    key = (policy.to_text(), violation_action)
    if key in _compiled:
        return _compiled[key]
    check_policy(policy)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (runs in the forked compiler)
        os.close(read_end)
        _compile_into(policy, violation_action, write_end)
    os.close(write_end)
    finished = False
    try:
        output, finished = _read_until_eof(read_end, time.monotonic() + timeout)
    finally:
        os.close(read_end)
        if not finished:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    lines, _, program = output.partition(b"\nBPF\n")
    last = lines.rsplit(b"\n", 1)[-1].decode()
    if not finished:
        raise PolicyError(f"{last[2:]}: libseccomp did not finish adding this rule within "
                          f"{timeout:g} s (libseccomp 2.5 loops forever on some rules mixing "
                          f"constants above 32 bits with non-== tests); write it differently")
    if last.startswith("E "):
        raise PolicyError(last[2:])
    if len(program) % 8 or not program:
        raise JailError(f"libseccomp produced no BPF program for {policy.path}")
    _compiled[key] = program
    return program


# Compiled programs by (policy text, action): a VMM spawns the same devices repeatedly.
_compiled: dict[tuple[str, str], bytes] = {}


def _compile_into(policy: Policy, violation_action: str, fd: int) -> None:
    """In the forked compiler: report each rule's origin, add it, then write the BPF."""
    status = 1
    try:
        flt = _new_filter(violation_action)
        for rule in policy.rules.values():
            os.write(fd, f"\nR {rule.origin}".encode())
            try:
                _add_rule(flt, rule)
            except PolicyError as e:
                os.write(fd, f"\nE {e}".encode())
                return
        os.write(fd, b"\nBPF\n")
        with open(fd, "wb", closefd=False) as out:
            flt.export_bpf(out)
        status = 0
    finally:
        os._exit(status)


def _read_until_eof(fd: int, deadline: float) -> tuple[bytes, bool]:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not linux.wait_readable(fd, left):
            return b"".join(chunks), False
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _check_action(violation_action: str) -> None:
    if violation_action not in VIOLATION_ACTIONS:
        raise JailError(f"violation action {violation_action!r} is not one of "
                        f"{', '.join(VIOLATION_ACTIONS)}")
    if pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        raise JailError("jail's seccomp policies are written for x86_64 only")


def _new_filter(violation_action: str) -> pyseccomp.SyscallFilter:
    flt = pyseccomp.SyscallFilter(VIOLATION_ACTIONS[violation_action])
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)  # x32 / i386 entry
    flt.set_attr(pyseccomp.Attr.CTL_NNP, 1)
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)  # binary tree: O(log n) per syscall
    return flt


def _add_rule(flt: pyseccomp.SyscallFilter, rule: Rule) -> None:
    number = syscall_number(rule.syscall)
    if rule.errno is not None:
        flt.add_rule(pyseccomp.ERRNO(rule.errno), number)
        return
    if not rule.clauses:
        flt.add_rule(pyseccomp.ALLOW, number)
        return
    _check_ordered_tests(rule)
    for clause in rule.clauses:
        for args in _clause_args(clause, rule):
            try:
                flt.add_rule(pyseccomp.ALLOW, number, *args)
            except OSError as e:
                raise PolicyError(f"{rule.origin}: libseccomp rejects '{clause}': "
                                  f"{e.strerror}") from None


_ORDERED = ("<", "<=", ">", ">=")


def _check_ordered_tests(rule: Rule) -> None:
    """Refuse what libseccomp 2.5 compiles wrongly instead of loading a filter that lies.

    Two '||' clauses each with an ordered test (<, <=, >, >=) of the same argument come
    out of libseccomp denying calls the rule allows (e.g. `arg2 < 5 || arg2 < 0x100000000`
    denies arg2 = 7), found by tests/jail/test_seccomp.py's kernel-verdict property.
    """
    tested: set[int] = set()
    for clause in rule.clauses:
        ordered = {c.arg for c in clause.comparisons if c.op in _ORDERED}
        for arg in sorted(ordered & tested):
            raise PolicyError(f"{rule.origin}: libseccomp miscompiles ordered tests (<, <=, >, >=) of "
                              f"arg{arg} in more than one '||' clause; merge them into one")
        tested |= ordered


def _clause_args(clause: Clause, rule: Rule) -> list[tuple[pyseccomp.Arg, ...]]:
    """libseccomp rules (each a tuple of Args that must all hold) equivalent to a clause.

    libseccomp has no "some bit of M is set" test, so `arg & M` becomes one rule per
    bit of M, (arg & bit) == bit; a clause with such tests is their cross product.
    """
    seen = set()
    for comparison in clause.comparisons:
        if comparison.arg in seen:
            # libseccomp 2.5 refuses two tests of one argument in one rule (EINVAL).
            raise PolicyError(f"{rule.origin}: libseccomp cannot test arg{comparison.arg} "
                              f"twice in one '&&' clause")
        seen.add(comparison.arg)
    choices = [_comparison_args(c) for c in clause.comparisons]
    count = 1
    for options in choices:
        count *= len(options)
    if count > MAX_RULES_PER_CLAUSE:
        raise PolicyError(f"{rule.origin}: '{clause}' expands to {count} libseccomp rules "
                          f"(at most {MAX_RULES_PER_CLAUSE}); use fewer bits with '&'")
    return list(itertools.product(*choices))


def _comparison_args(c: Comparison) -> list[pyseccomp.Arg]:
    if c.op == "&":
        bits = [1 << i for i in range(64) if c.value >> i & 1]
        return [pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, bit, bit) for bit in bits]
    if c.op == "in":
        return [pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, ~c.value & U64_MASK, 0)]
    return [pyseccomp.Arg(c.arg, _OPS[c.op], c.value)]


def install_filter(program: bytes, *, listener: bool) -> int | None:
    """Set no_new_privs and load a BPF program on every thread of this process (TSYNC).

    With listener=True the filter's SECCOMP_RET_USER_NOTIF actions go to a new listener
    fd, which is returned. Nothing runs after seccomp(2) here but a plain return through
    ctypes, so no policy needs anything for it.
    """
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")
    flags = _SECCOMP_FILTER_FLAG_TSYNC
    if listener:
        flags |= _SECCOMP_FILTER_FLAG_NEW_LISTENER | _SECCOMP_FILTER_FLAG_TSYNC_ESRCH
    result = linux.seccomp_set_mode_filter(program, flags)
    if result > 0 and not listener:
        raise OSError(errno.EBUSY, f"seccomp TSYNC failed: thread {result} has another filter")
    return result if listener else None


# --- supervisor side -----------------------------------------------------------------

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
_NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
_NOTIF_RESP = struct.Struct("=QqiI")


def _ioc(direction: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | number


_IOC_WRITE, _IOC_READ = 1, 2
_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, _NOTIF.size)
_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, _NOTIF_RESP.size)
_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
_USER_NOTIF_FLAG_CONTINUE = 1


@dataclass(frozen=True)
class Violation:
    """A jailed process made a syscall its policy does not allow and now waits for an answer."""

    id: int              # the kernel's cookie for this notification
    pid: int             # the caller, as seen from the supervisor's pid namespace
    syscall_nr: int
    syscall: str         # libseccomp's name for syscall_nr
    args: tuple[int, ...]
    arch: int            # AUDIT_ARCH_* of the call
    instruction_pointer: int

    def __str__(self) -> str:
        args = ", ".join(f"{a:#x}" for a in self.args)
        return f"pid {self.pid} called forbidden syscall {self.syscall}({args})"


class SeccompListener:
    """The supervisor's end of a seccomp user-notification fd.

    Use it from a thread that may block: receive() waits in poll(2) and the ioctls, both
    with the GIL released. Or from an event loop: wait until fileno() is readable (it
    also becomes readable, as POLLHUP, once every process under the filter has exited),
    then call receive(timeout=0).

    Every Violation must be answered with deny() or allow(); until then the jailed
    thread stays blocked in the syscall (a SIGKILL still ends it).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Stop supervising: pending and future violations then fail with ENOSYS."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def receive(self, timeout: float | None = None) -> Violation | None:
        """The next violation; None once no process is left under the filter.

        Raises TimeoutError when timeout (seconds) passes first.
        """
        if self._fd < 0:
            raise ValueError("the seccomp listener is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = poller.poll(None if left is None else math.ceil(left * 1000))
            if not events:
                raise TimeoutError("no seccomp violation arrived in time")
            if events[0][1] & select.POLLIN:
                buffer = bytearray(_NOTIF.size)  # the kernel wants it zeroed
                try:
                    fcntl.ioctl(self._fd, _NOTIF_RECV, buffer, True)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR):
                        continue  # the caller was killed or interrupted meanwhile
                    raise
                return _violation(buffer)
            return None  # POLLHUP: the filter has no process left

    def deny(self, violation: Violation, error: int = errno.EPERM) -> bool:
        """Make the syscall fail with `error`. False if the caller is already gone."""
        return self._respond(violation, 0, -error, 0)

    def allow(self, violation: Violation) -> bool:
        """Let the kernel run the syscall as if it were allowed (FLAG_CONTINUE, 5.5+).

        Safe for logging only: the supervisor must not base security decisions on the
        syscall's pointer arguments, which the caller can change meanwhile.
        """
        return self._respond(violation, 0, 0, _USER_NOTIF_FLAG_CONTINUE)

    def is_pending(self, violation: Violation) -> bool:
        """Whether the caller still waits for an answer to this violation."""
        try:
            fcntl.ioctl(self._fd, _NOTIF_ID_VALID, struct.pack("=Q", violation.id))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def _respond(self, violation: Violation, value: int, error: int, flags: int) -> bool:
        response = _NOTIF_RESP.pack(violation.id, value, error, flags)
        try:
            fcntl.ioctl(self._fd, _NOTIF_SEND, response)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False  # killed, or its syscall was interrupted by a signal
            raise
        return True


def receive_violation(listener_fd: int, timeout: float | None = 0.0) -> Violation | None:
    """SeccompListener.receive() on a bare fd, for poll-driven supervisors: None when
    nothing arrived within timeout (default: do not wait) or nobody is left."""
    try:
        return SeccompListener(listener_fd).receive(timeout)
    except TimeoutError:
        return None


def respond(listener_fd: int, violation: Violation, *, allow: bool,
            error: int = errno.EPERM) -> bool:
    """Let the syscall run (allow=True) or make it fail with `error`. False if the
    caller is gone."""
    listener = SeccompListener(listener_fd)
    return listener.allow(violation) if allow else listener.deny(violation, error)


def _violation(buffer: bytes) -> Violation:
    notif_id, pid, _flags, nr, arch, ip, *args = _NOTIF.unpack(buffer)
    return Violation(id=notif_id, pid=pid, syscall_nr=nr, syscall=syscall_name(nr, arch),
                     args=tuple(args), arch=arch, instruction_pointer=ip)
