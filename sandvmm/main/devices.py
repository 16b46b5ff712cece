"""Starting device children and watching over them.

Each virtio device runs in its own child, jailed by the `jail` package (or merely forked
with --disable-sandbox). Children are started before any thread exists in main, since fork
and threads do not mix. Afterwards one supervisor thread in main serves every child's irq
and memory channels, and notices a child's death or seccomp violation at once (pidfds and
seccomp listener fds are pollable), so a dead device stops the VM instead of hanging it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import jail

from sandvmm.devices.virtio import shell
from sandvmm.errors import UserError
from sandvmm.main.device_proxy import Channels, DeviceGone, DeviceProxy
from sandvmm.memory import GuestMemory

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies" / "x86_64"
STARTUP_TIMEOUT = 60.0  # seconds for a jailed child to describe itself (Python under the lab's TCG is slow)


@dataclass
class DeviceSpec:
    name: str  # for messages and the process name: rng, console, vda...
    core: shell.DeviceCore
    keep_fds: Sequence[int] = ()  # host fds its backend uses (a sink, an input, disk images)
    backend_tasks: Sequence[shell.BackendTask] = ()
    policy: str = ""  # policies/x86_64/<policy>.policy; the name when empty

    @property
    def policy_name(self) -> str:
        return self.policy or self.name


@dataclass
class SandboxOptions:
    enabled: bool = True
    policy_dir: Path = POLICY_DIR
    log_failures: bool = False  # crosvm's --seccomp-log-failures: report violations, let them run


class ForkedProcess:
    """A device child without the jail (--disable-sandbox): what main uses of jail.JailedProcess."""

    listener_fd = None

    def __init__(self, target: Callable[[], int], keep_fds: Sequence[int]):
        self.pid = os.fork()
        if self.pid == 0:
            status = 70
            try:
                jail.close_fds_except(frozenset({0, 1, 2, *keep_fds}))
                status = target()
            except BaseException:
                traceback.print_exc()  # unjailed is for debugging: show everything
            finally:
                os._exit(status)
        self.pidfd = os.pidfd_open(self.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        os.close(self.pidfd)


def _wait_status(pid: int) -> str:
    """Reap the child; say how it ended."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "it ended"
    if os.WIFSIGNALED(status):
        return f"it was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"it exited with status {os.WEXITSTATUS(status)}"


def check_policy(sandbox: SandboxOptions, device: str) -> Path:
    """The device's policy file, or a usage error saying it is missing."""
    policy = sandbox.policy_dir / f"{device}.policy"
    if not policy.is_file():
        raise UserError(f"no seccomp policy for device {device}: {policy} is missing",
                        hint="use --seccomp-policy-dir DIR, or --disable-sandbox to debug", status=2)
    return policy


@dataclass
class Device:
    spec: DeviceSpec
    process: object
    proxy: DeviceProxy
    ended: bool = False
    reported_syscalls: set[str] = field(default_factory=set)


@dataclass
class DeviceHost:
    """All device children of one VM and the thread that watches them."""

    sandbox: SandboxOptions
    on_failure: Callable[[str], None]  # the VM must stop: a one-line reason
    devices: list[Device] = field(default_factory=list)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # the supervisor and vCPUs both reap

    def launch(self, spec: DeviceSpec, memory: GuestMemory, make_proxy: Callable[[Channels], DeviceProxy]) -> DeviceProxy:
        parent, child = Channels.pairs()
        keep = [*child.fds(), *spec.keep_fds, sys.stderr.fileno()]
        target = lambda: shell.serve(spec.core, memory, child.fds(), spec.backend_tasks)  # noqa: E731
        try:
            process = self._spawn(spec, keep, target)
        finally:
            child.close()
        proxy = make_proxy(parent)
        proxy.on_gone = lambda name, why: self._gone(name)
        device = Device(spec, process, proxy)
        self.devices.append(device)
        try:
            proxy.start(lambda channel: self._wait_while_starting(device, channel))
        except DeviceGone as error:
            raise UserError(str(error), hint="--disable-sandbox shows a device's traceback") from None
        return proxy

    def _spawn(self, spec: DeviceSpec, keep: list[int], target: Callable[[], int]):
        if not self.sandbox.enabled:
            return ForkedProcess(target, keep)
        policy = check_policy(self.sandbox, spec.policy_name)
        config = jail.JailConfig(name=f"sandvmm-{spec.name}", policy=policy, violation_action="notify", keep_fds=keep)
        try:
            return jail.spawn(config, target)
        except (jail.JailError, jail.PolicyError) as error:
            raise UserError(f"cannot sandbox device {spec.name}: {error}",
                            hint="sandvmm doctor checks what the sandbox needs; --disable-sandbox runs devices unjailed") from None

    def _wait_while_starting(self, device: Device, channel) -> None:
        """Until the child speaks on channel. Before the supervisor thread runs, this is what
        notices a child that dies, breaks its seccomp policy (it would wait for our verdict
        forever) or hangs."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        listener = device.process.listener_fd
        while not device.ended:
            watched = [channel.fileno(), device.process.pidfd, *([listener] if listener is not None else [])]
            ready, _, _ = select.select(watched, [], [], max(0.0, deadline - time.monotonic()))
            if channel.fileno() in ready:
                return
            if listener is not None and listener in ready:
                self._violation(device)  # stops it, or lets the call through under --seccomp-log-failures
            elif device.process.pidfd in ready:
                with self.lock:
                    device.ended = True
                    raise DeviceGone(f"device {device.spec.name} failed to start: {_wait_status(device.process.pid)}")
            elif not ready:
                raise DeviceGone(f"device {device.spec.name} did not start within {STARTUP_TIMEOUT:.0f} s")
        raise DeviceGone(f"device {device.spec.name} was stopped while starting")

    # --- the supervisor thread -----------------------------------------------------------------
    def start(self) -> None:
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._supervise, name="devices", daemon=True)
        self.thread.start()

    def _supervise(self) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {self.wakeup_read: lambda: None}
        poller.register(self.wakeup_read, select.POLLIN)
        for device in self.devices:
            for fd, handler in ((device.proxy.channels.irq.fileno(), device.proxy.serve_irq),
                                (device.proxy.channels.memory.fileno(), device.proxy.serve_memory),
                                (device.process.pidfd, lambda d=device: self._died(d))):
                handlers[fd] = handler
                poller.register(fd, select.POLLIN)
            if device.process.listener_fd is not None:
                handlers[device.process.listener_fd] = lambda d=device: self._violation(d)
                poller.register(device.process.listener_fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self.wakeup_read:
                    return
                try:
                    if handlers[fd]() is False:
                        poller.unregister(fd)
                except (EOFError, OSError):
                    poller.unregister(fd)  # the child is gone; its pidfd reports why

    def _died(self, device: Device) -> None:
        with self.lock:
            if device.ended:
                return
            device.ended = True
            how = _wait_status(device.process.pid)
        self.on_failure(f"device {device.spec.name} stopped ({how}); stopping the VM")

    def _gone(self, name: str) -> None:
        device = next(d for d in self.devices if d.spec.name == name)
        select.select([device.process.pidfd], [], [], 1.0)  # it is dying: let the pidfd say how
        self._died(device)

    def _violation(self, device: Device) -> bool:
        """Serve one seccomp notification; False once the child is gone."""
        violation = jail.receive_violation(device.process.listener_fd)
        if violation is None:
            return False
        if self.sandbox.log_failures:
            if violation.syscall not in device.reported_syscalls:  # once each, not a flood
                device.reported_syscalls.add(violation.syscall)
                print(f"sandvmm: device {device.spec.name}: seccomp violation: {violation.syscall} "
                      f"(let through: --seccomp-log-failures)", file=sys.stderr, flush=True)
            jail.respond(device.process.listener_fd, violation, allow=True)
            return True
        with self.lock:
            device.process.kill()
            device.ended = True
            _wait_status(device.process.pid)
        print(f"sandvmm: device {device.spec.name} made a forbidden system call: {violation.syscall}; "
              "stopping the VM", file=sys.stderr, flush=True)
        self.on_failure(f"device {device.spec.name} was stopped by its seccomp policy ({violation.syscall})")
        return True

    def stop(self) -> None:
        """Kill and reap every child: none outlives the VM."""
        if self.thread is not None:
            os.write(self.wakeup_write, b"x")
            self.thread.join(timeout=2)
        for device in self.devices:
            with self.lock:
                device.process.kill()
                if not device.ended:
                    device.ended = True
                    _wait_status(device.process.pid)
            device.proxy.close()
            device.process.close()
