"""spawn(): start a child, jail it completely, then run a Python callable in it.

Process shape. The caller forks a short-lived helper; the helper clone(2)s the jailed
child with CLONE_NEW* flags and CLONE_PARENT, sends its pid back and exits. The jailed
child is thus pid 1 of its own pid namespace and yet a *direct* child of the caller
(waitpid, pidfd, parent-death signal all refer to the caller). The helper exists because
a raw clone() is only safe from a single-threaded CPython: os.fork() gives us one.

Handshake over a private SOCK_SEQPACKET socketpair:
    helper -> caller   "P" pid, user-namespace-used    or "E" reason
    caller -> child    "G"   (after writing the id maps, when the caller is root)
    child  -> caller   "R" [+ listener fd]             or "E" reason
    child closes the socket: its fd table is final, and spawn() returns.

start() returns after "G", and the caller collects the rest with finish() when it
suits it: the child jails itself (and runs its `prepare`, e.g. imports that need the
host's files) while the caller gets on with its own work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Self

from jail import linux, mounts, namespaces, privileges, seccomp
from jail.errors import JailError
from jail.mounts import BindMount
from jail.policy import Policy, load_policy
from jail.seccomp import SeccompListener

#: Exit status of a child whose target raised (EX_SOFTWARE).
UNCAUGHT_EXCEPTION_STATUS = 70
#: Exit status of a child that failed while being jailed (EX_OSERR).
SETUP_FAILED_STATUS = 71
#: What the jail itself calls after the filter is loaded; a policy must allow them.
HANDSHAKE_SYSCALLS = ("sendmsg", "close", "exit_group")
NOBODY = 65534

_MIDDLE_MESSAGE = struct.Struct("=i?")


@dataclass
class JailConfig:
    name: str                                   # for messages, e.g. "rng"
    policy: Path | str | Policy                 # seccomp policy (file or parsed)
    violation_action: str = "notify"            # "kill" | "notify" | "log"
    # Every other fd is closed in the child. fd 2 stays by default so that a crashing
    # child's one-line message reaches the terminal; pass () for a child with no fds.
    keep_fds: Sequence[int] = (2,)
    bind_mounts: Sequence[tuple[str, str, bool] | BindMount] = ()  # (host, jail, writable)
    rlimits: Mapping[int, tuple[int, int]] = field(
        default_factory=lambda: dict(privileges.DEFAULT_RLIMITS))
    user_namespace: bool | None = None          # None: whenever possible (always as non-root)
    # The host uid/gid the child runs as when the caller is root (as non-root: the
    # caller's own, the only ones a user namespace lets it map).
    host_ids_when_root: tuple[int, int] = (NOBODY, NOBODY)
    start_timeout: float = 10.0                 # seconds until spawn() gives up


class JailedProcess:
    """A running jailed child. Wait on fileno() (a pidfd: readable once it exits).

    Reaping is done by poll()/wait() with waitpid(pid): do not reap children elsewhere
    with waitpid(-1).
    """

    def __init__(self, name: str, pid: int, user_namespace: bool) -> None:
        self.name = name
        self.pid = pid
        self.user_namespace = user_namespace
        self.pidfd = os.pidfd_open(pid)
        self.listener: SeccompListener | None = None
        self.returncode: int | None = None  # exit status, or -signal number

    @property
    def listener_fd(self) -> int | None:
        return None if self.listener is None else self.listener.fileno()

    def fileno(self) -> int:
        return self.pidfd

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (-N when killed by signal N); TimeoutError after timeout s."""
        if self.returncode is None:
            if timeout is not None:
                if self.pidfd < 0:
                    raise ValueError("wait(timeout) needs the pidfd, which close() released")
                if not linux.wait_readable(self.pidfd, timeout):
                    raise TimeoutError(f"jailed {self.name!r} (pid {self.pid}) is still running")
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child (through the pidfd: no pid reuse race). Being pid 1 of its
        namespace, it only receives SIGKILL, SIGSTOP and signals it has a handler for."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.pidfd >= 0:
                    signal.pidfd_send_signal(self.pidfd, sig)
                else:  # still unreaped, so the pid cannot have been reused
                    os.kill(self.pid, sig)

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "is still running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def close(self) -> None:
        """Release the pidfd and the listener (does not kill the child)."""
        if self.listener is not None:
            self.listener.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        self.wait()
        self.close()


@dataclass(frozen=True)
class _Plan:
    """Everything the child needs, prepared by the caller before forking."""

    name: str
    program: bytes
    notify: bool
    keep_fds: frozenset[int]
    binds: tuple[BindMount, ...]
    rlimits: Mapping[int, tuple[int, int]]
    user_namespace: bool | None
    privileged: bool
    host_uid: int
    host_gid: int
    last_cap: int


def spawn(config: JailConfig, target: Callable[[], int | None],
          prepare: Callable[[], None] | None = None) -> JailedProcess:
    """Start a child, jail it completely, then run target() in it.

    The child exits with target's return value (None: 0), or 70 after printing a
    one-line message to stderr (if fd 2 is kept) when target raises. spawn() returns
    once the child is fully jailed, or raises JailError with a one-line reason.
    `prepare()`, if given, runs in the child before its root changes: what it imports
    is there for target, which sees no host file. It forks: like os.fork(), it is
    safest before the process starts threads. The child gets SIGKILL when the calling
    *thread* exits.
    """
    return start(config, target, prepare).finish()


class StartingJail:
    """A child that is jailing itself: start() has returned, finish() has not.

    `process` is usable at once (its pidfd says if the child dies); the seccomp
    listener comes with finish(). Any thread may call finish(), once.
    """

    def __init__(self, plan: _Plan, process: JailedProcess, sock: socket.socket, deadline: float):
        self.plan = plan
        self.process = process
        self._sock = sock
        self.deadline = deadline

    def fileno(self) -> int:
        """Readable when the child has something to say (finish() will not wait long)."""
        return self._sock.fileno()

    def finish(self) -> JailedProcess:
        """Wait until the child is fully jailed (or start_timeout passed since start())."""
        try:
            with self._sock:
                _receive_ready(self.plan, self.process, self._sock, self.deadline)
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.process.close()
            raise
        return self.process

    def close(self) -> None:
        """Give up on the handshake (the caller kills the child)."""
        self._sock.close()


def start(config: JailConfig, target: Callable[[], int | None],
          prepare: Callable[[], None] | None = None) -> StartingJail:
    """Like spawn(), but return as soon as the child exists and may jail itself."""
    plan = _plan(config)
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.monotonic() + config.start_timeout
    try:
        helper = os.fork()
        if helper == 0:
            parent_end.close()
            _run_helper(plan, child_end, target, prepare)
        child_end.close()
        try:
            kind, payload, _ = _receive(parent_end, deadline, config.name)
        except BaseException:
            os.kill(helper, signal.SIGKILL)
            raise
        finally:
            os.waitpid(helper, 0)
        if kind != b"P":
            raise JailError(_failure(config.name, payload.decode(errors="replace")
                                     or "the helper process died"))
        pid, user_namespace = _MIDDLE_MESSAGE.unpack(payload)
        process = JailedProcess(config.name, pid, user_namespace)
        try:
            _let_go(plan, process, parent_end)
        except BaseException:
            process.kill()
            process.wait()
            process.close()
            raise
    except BaseException:
        parent_end.close()
        raise
    return StartingJail(plan, process, parent_end, deadline)


def _plan(config: JailConfig) -> _Plan:
    if config.violation_action not in seccomp.VIOLATION_ACTIONS:
        raise JailError(f"jail {config.name!r}: violation action {config.violation_action!r}"
                        f" is not one of {', '.join(seccomp.VIOLATION_ACTIONS)}")
    policy = (config.policy if isinstance(config.policy, Policy)
              else load_policy(config.policy))
    missing = [name for name in HANDSHAKE_SYSCALLS if name not in policy.rules]
    if missing:
        raise JailError(f"jail {config.name!r}: policy {policy.path} must allow "
                        f"{', '.join(missing)} (the jail calls them after loading it)")
    for fd in config.keep_fds:
        try:
            os.fstat(fd)
        except OSError:
            raise JailError(f"jail {config.name!r}: keep_fds has {fd}, which is not an "
                            f"open file descriptor") from None
    privileged = os.geteuid() == 0
    if config.user_namespace is False and not privileged:
        raise JailError(f"jail {config.name!r}: without a user namespace only root can "
                        f"create the other namespaces")
    host_uid, host_gid = (config.host_ids_when_root if privileged
                          else (os.geteuid(), os.getegid()))
    return _Plan(
        name=config.name,
        program=seccomp.compile_program(policy, config.violation_action),
        notify=config.violation_action == "notify",
        keep_fds=frozenset(config.keep_fds),
        binds=tuple(mounts.plan_bind_mounts(config.bind_mounts)),
        rlimits=dict(config.rlimits),
        user_namespace=config.user_namespace,
        privileged=privileged,
        host_uid=host_uid,
        host_gid=host_gid,
        last_cap=privileges.last_capability(),
    )


def _failure(name: str, reason: str) -> str:
    return f"cannot start jailed {name!r}: {reason}"


def _receive(sock: socket.socket, deadline: float, name: str) -> tuple[bytes, bytes, list[int]]:
    """One handshake message: (kind, payload, fds); kind b"" means the peer is gone."""
    if not linux.wait_readable(sock.fileno(), deadline - time.monotonic()):
        raise JailError(_failure(name, "the child did not finish jailing itself in time "
                                       "(under 'notify', a syscall the jail needs after "
                                       "loading the filter may be waiting for an answer)"))
    data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    return data[:1], data[1:], fds


def _let_go(plan: _Plan, process: JailedProcess, sock: socket.socket) -> None:
    """Write the child's id maps if that is ours to do, then tell it to jail itself."""
    if process.user_namespace and plan.privileged:
        try:
            namespaces.write_id_map(process.pid, 0, plan.host_uid, 0, plan.host_gid,
                                    deny_setgroups=False)
        except OSError as e:
            raise JailError(_failure(plan.name, f"cannot write the user namespace's id maps: "
                                                f"{e.strerror}")) from None
    sock.sendmsg([b"G"])


def _receive_ready(plan: _Plan, process: JailedProcess, sock: socket.socket,
                   deadline: float) -> None:
    name = plan.name
    kind, payload, fds = _receive(sock, deadline, name)
    if kind == b"R":
        if plan.notify:
            process.listener = SeccompListener(fds[0])
        kind, payload, _ = _receive(sock, deadline, name)  # wait for the child's close
        if kind == b"":
            return
    for fd in fds:
        os.close(fd)
    if kind == b"E":
        raise JailError(_failure(name, payload.decode(errors="replace")))
    with contextlib.suppress(TimeoutError):
        process.wait(timeout=1.0)
    raise JailError(_failure(name, f"the child {process.describe_exit()} while being jailed"
                                   f" (does the policy allow {', '.join(HANDSHAKE_SYSCALLS)}"
                                   f" and what Python needs to run?)"))


def _run_helper(plan: _Plan, sock: socket.socket, target: Callable[[], int | None],
                prepare: Callable[[], None] | None) -> NoReturn:
    """In the helper: clone the jailed child as a sibling, report its pid, exit."""
    try:
        pid, user_namespace = _clone_jailed(plan)
        if pid == 0:
            _run_jailed(plan, sock, target, prepare, user_namespace)
        sock.sendmsg([b"P" + _MIDDLE_MESSAGE.pack(pid, user_namespace)])
        os._exit(0)
    except _SetupFailed as e:
        _send(sock, b"E", str(e))
    finally:
        os._exit(SETUP_FAILED_STATUS)


def _clone_jailed(plan: _Plan) -> tuple[int, bool]:
    """clone() into new namespaces: (0 in the child | the child's pid, user ns used)."""
    def clone(user_namespace: bool) -> int:
        return linux.clone_process(namespaces.NAMESPACES | linux.CLONE_PARENT
                                   | signal.SIGCHLD
                                   | (linux.CLONE_NEWUSER if user_namespace else 0))

    want_user_namespace = plan.user_namespace is not False
    try:
        return clone(want_user_namespace), want_user_namespace
    except OSError as e:
        refused = want_user_namespace and e.errno in namespaces.USERNS_REFUSALS
        if refused and plan.user_namespace is None and plan.privileged:
            try:
                return clone(False), False  # root can do without one
            except OSError as e2:
                e = e2
        elif refused:
            hint = namespaces.user_namespace_hint(plan.privileged)
            raise _SetupFailed(f"cannot create a user namespace: {os.strerror(e.errno)} "
                               f"({hint})") from None
        raise _SetupFailed(f"cannot create namespaces: {os.strerror(e.errno)}") from None


def _send(sock: socket.socket, kind: bytes, text: str) -> None:
    with contextlib.suppress(OSError):
        sock.sendmsg([kind + text.replace("\n", " ").encode(errors="replace")])


class _SetupFailed(Exception):
    pass


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn any failure inside into a one-line `what: reason`."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        if e.filename:
            reason = f"{e.filename}: {reason}"
        raise _SetupFailed(f"{what}: {reason}") from None
    except Exception as e:  # noqa: BLE001 — any failure becomes the one-line reason
        raise _SetupFailed(f"{what}: {type(e).__name__}: {e}") from None


def _run_jailed(plan: _Plan, sock: socket.socket, target: Callable[[], int | None],
                prepare: Callable[[], None] | None, user_namespace: bool) -> NoReturn:
    """In the jailed child: jail ourselves step by step, then run target()."""
    try:
        _jail_self(plan, sock, prepare, user_namespace)
    except _SetupFailed as e:
        _send(sock, b"E", str(e))
        os._exit(SETUP_FAILED_STATUS)
    except BaseException as e:  # noqa: BLE001 — the child must never unwind into the caller
        _send(sock, b"E", f"{type(e).__name__}: {e}")
        os._exit(SETUP_FAILED_STATUS)
    os._exit(_run_target(plan.name, target, stderr_kept=2 in plan.keep_fds))


def _jail_self(plan: _Plan, sock: socket.socket, prepare: Callable[[], None] | None,
               user_namespace: bool) -> None:
    with _step("arm the parent-death signal"):
        privileges.die_with_parent(sock)
    if sock.recv(1) != b"G":  # the parent writes our id maps first, or died
        os._exit(SETUP_FAILED_STATUS)
    if user_namespace and not plan.privileged:
        with _step("map our uid and gid in the user namespace"):
            privileges.make_dumpable()
            namespaces.write_id_map("self", 0, plan.host_uid, 0, plan.host_gid,
                                    deny_setgroups=True)
    with _step("name the process"):
        privileges.set_process_name(plan.name)
    with _step("start a new session"):
        os.setsid()  # no controlling terminal: no job-control signals, no TIOCSTI
    with _step("close inherited file descriptors"):
        linux.close_fds_except(plan.keep_fds | {sock.fileno()})
    if prepare is not None:
        with _step("prepare"):  # the last step that sees the host's files
            prepare()
    # With the caller's uid still (for root: an owner's access, but no capability
    # outside our user namespace), so that root can bind paths only it can reach.
    with _step("open a bind mount source"):
        sources = mounts.open_sources(plan.binds)
    if plan.privileged and user_namespace:
        # Files created on our tmpfs need a uid mapped in our namespace: its 0, which
        # is the host's host_uid. Our capabilities in the namespace stay.
        with _step(f"become host uid {plan.host_uid}"):
            privileges.become(0, 0)
            privileges.die_with_parent(sock)
    with _step("build the root filesystem"):
        mounts.enter_new_root(plan.binds, sources)
    with _step("set resource limits"):
        privileges.apply_rlimits(plan.rlimits)
    with _step("drop the capability bounding set"):
        privileges.drop_bounding_set(plan.last_cap)
    if plan.privileged and not user_namespace:
        with _step(f"become host uid {plan.host_uid}"):  # this clears every capability
            privileges.become(plan.host_uid, plan.host_gid)
            privileges.die_with_parent(sock)
    with _step("drop capabilities"):
        privileges.drop_capabilities()
    with _step("keep one malloc arena"):
        privileges.one_malloc_arena()
    with _step("load the seccomp filter"):
        listener = seccomp.install_filter(plan.program, listener=plan.notify)
    # From here on, every syscall must be allowed by the policy (HANDSHAKE_SYSCALLS).
    if listener is None:
        sock.sendmsg([b"R"])
    else:
        socket.send_fds(sock, [b"R"], [listener])
        os.close(listener)
    sock.close()


def _run_target(name: str, target: Callable[[], int | None], stderr_kept: bool) -> int:
    def report(message: str) -> None:
        # To fd 2 itself: sys.stderr may wrap another fd, which was closed (pytest does).
        if stderr_kept:
            with contextlib.suppress(OSError):
                os.write(2, (message.replace("\n", " ") + "\n").encode(errors="replace"))

    try:
        result = target()
        status = 0 if result is None else int(result) & 0xFF
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = (e.code or 0) & 0xFF
        else:
            report(f"jailed {name!r}: {e.code}")
            status = 1
    except BaseException as e:  # noqa: BLE001 — report, never unwind into the caller
        report(f"jailed {name!r}: uncaught {type(e).__name__}: {e}")
        status = UNCAUGHT_EXCEPTION_STATUS
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    return status

