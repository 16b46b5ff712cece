"""Starting device children and watching over them.

Each virtio device runs in its own child, jailed by the `jail` package (or merely forked
with --disable-sandbox). Children are forked before any thread exists in main, since fork
and threads do not mix, and main does not wait for them: a child imports its trio loop
(which main never imports), jails itself and registers its eventfds while the vCPUs boot
the guest, which does not touch a device for its first second or so. Main knows each
device's BARs and header without asking (DeviceProxy.describe); a guest access that needs
the child simply waits for it.

One supervisor thread in main first collects each jailed child's handshake (and with it the
seccomp listener), then serves every child's irq and memory channels, and notices a child's
death or seccomp violation at once (pidfds and seccomp listener fds are pollable), so a dead
device stops the VM instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import jail

from sandvmm.devices.virtio.transport import VirtioPciTransport
from sandvmm.errors import UserError
from sandvmm.main.device_proxy import Channels, DeviceProxy
from sandvmm.memory import GuestMemory

if TYPE_CHECKING:
    from sandvmm.devices.virtio import shell

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies" / "x86_64"
STARTUP_TIMEOUT = 60.0  # seconds for a child to jail itself (Python under the lab's TCG is slow)


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


def host_cpus() -> int:
    """CPUs this process may run on. With one, the guest, main and the children take turns."""
    return len(os.sched_getaffinity(0))


def _import_device_loop() -> None:
    """In a child, before its root changes: trio and the device loop, from the host's files."""
    from sandvmm.devices.virtio import shell  # noqa: F401 (kept in sys.modules for _serve)


def _serve(spec: DeviceSpec, memory: GuestMemory, channel_fds: Sequence[int]) -> int:
    from sandvmm.devices.virtio import shell  # already imported by _import_device_loop

    return shell.serve(spec.core, memory, channel_fds, spec.backend_tasks)


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
    starting: object = None  # a jail.StartingJail until the supervisor has its handshake
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
        """Fork the device's child and return its proxy without waiting for the child."""
        parent, child = Channels.pairs()
        keep = [*child.fds(), *spec.keep_fds, sys.stderr.fileno()]
        target = lambda: _serve(spec, memory, child.fds())  # noqa: E731
        try:
            process, starting = self._spawn(spec, keep, target)
        finally:
            child.close()
        if host_cpus() < 2:
            # A child woken by a kick would preempt the guest at once and serve what it had
            # queued so far (about 8 of fio's 32 requests); a batch task does not preempt on
            # waking, so it runs when the guest waits, and serves them all in one go (in a
            # 1-vCPU lab, 4 KiB random reads went from 0.60 to 1.07 of QEMU's IOPS).
            try:
                os.sched_setscheduler(process.pid, os.SCHED_BATCH, os.sched_param(0))
            except OSError:
                pass  # the child is gone already: the supervisor will say why
        proxy = make_proxy(parent)
        proxy.describe(VirtioPciTransport(spec.core))
        proxy.on_gone = lambda name, why: self._gone(name)
        self.devices.append(Device(spec, process, proxy, starting))
        return proxy

    def _spawn(self, spec: DeviceSpec, keep: list[int], target: Callable[[], int]):
        if not self.sandbox.enabled:
            return ForkedProcess(target, keep), None
        policy = check_policy(self.sandbox, spec.policy_name)
        config = jail.JailConfig(name=f"sandvmm-{spec.name}", policy=policy, violation_action="notify",
                                 keep_fds=keep, start_timeout=STARTUP_TIMEOUT)
        try:
            starting = jail.start(config, target, prepare=_import_device_loop)
        except (jail.JailError, jail.PolicyError) as error:
            raise UserError(f"cannot sandbox device {spec.name}: {error}",
                            hint="sandvmm doctor checks what the sandbox needs; --disable-sandbox runs devices unjailed") from None
        return starting.process, starting

    def _finish_starting(self, device: Device) -> bool:
        """The child's handshake (it is jailed, and its seccomp listener is ours); False if it failed."""
        starting, device.starting = device.starting, None
        try:
            starting.finish()  # a child that dies or hangs meanwhile ends this with an error
        except jail.JailError as error:
            with self.lock:
                device.ended = True  # finish() reaped it
            self.on_failure(f"device {device.spec.name} failed to start: {error}")
            return False
        return True

    # --- the supervisor thread -----------------------------------------------------------------
    def start(self) -> None:
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._supervise, name="devices", daemon=True)
        self.thread.start()

    def wait_started(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until every child has made its startup requests, or failed (the supervisor reports that)."""
        deadline = time.monotonic() + timeout
        for device in self.devices:
            while not device.proxy.started.wait(0.05) and not device.ended and time.monotonic() < deadline:
                pass

    def _supervise(self) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {self.wakeup_read: lambda: None}
        poller.register(self.wakeup_read, select.POLLIN)
        for device in self.devices:
            if device.starting is not None and not self._finish_starting(device):
                continue
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
        if device.ended:  # already reported (a failed start closed its pidfd)
            return
        with contextlib.suppress(ValueError, OSError):
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
        for device in self.devices:  # first, so that a handshake the supervisor waits for ends now
            device.process.kill()
        if self.thread is not None:
            os.write(self.wakeup_write, b"x")
            self.thread.join(timeout=2)
        for device in self.devices:
            with self.lock:
                if not device.ended:
                    device.ended = True
                    _wait_status(device.process.pid)
            if device.starting is not None:  # never collected (stopped before the supervisor ran)
                device.starting.close()
            device.proxy.close()
            device.process.close()
