"""`sandvmm run`: check the host and the arguments, boot the machine, connect the console, exit.

The main thread owns the terminal and signals: it waits on stdin (interactive console
only) and a wakeup pipe, while the vCPU threads run the guest. Every way out goes through
one `finally` that stops the vCPUs and restores the terminal.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandvmm import protocol
from sandvmm.errors import UserError
from sandvmm.guest.protocol import READY_MARKER, kernel_command_line
from sandvmm.main import kvm
from sandvmm.main.boot import read_kernel
from sandvmm.fdio import fd_writer
from sandvmm.main.block import block_specs, root_parameter
from sandvmm.main.devices import DeviceSpec, SandboxOptions, check_policy
from sandvmm.main.machine import Machine, MachineConfig, Outcome
from sandvmm.main.vcpu import install_kick_handler

log = logging.getLogger("sandvmm")

MIN_MEM_MIB = 128
MAX_CPUS = 254  # APIC IDs 0..253; 255 is broadcast and 254 our IOAPIC's


@dataclass
class RunConfig:
    kernel: Path | None = None
    initrd: Path | None = None
    params: str = ""
    mem_mib: int = 512
    cpus: int = 1
    command: list[str] = field(default_factory=list)
    serial_output: Path | None = None  # None: stdout
    virtio_console: bool = False
    virtio_console_output: Path | None = None  # None: stdout
    virtio_console_stdin: bool = False  # stdin feeds hvc0 instead of COM1
    rng: bool = True
    blocks: list[dict] = field(default_factory=list)  # parsed --block options, in vda, vdb... order
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)
    kvm_device: str = "/dev/kvm"
    control_socket: Path | None = None  # crosvm's --socket: `sandvmm stop PATH` stops the VM


def _host_mem_mib() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def check_config(config: RunConfig) -> None:
    if config.mem_mib < MIN_MEM_MIB:
        raise UserError(f"--mem {config.mem_mib} is too small", hint=f"give at least {MIN_MEM_MIB} MiB", status=2)
    if config.mem_mib > _host_mem_mib():
        raise UserError(f"--mem {config.mem_mib} is more than this host's {_host_mem_mib()} MiB of RAM",
                        hint="give a smaller --mem", status=2)
    if not 1 <= config.cpus <= MAX_CPUS:
        raise UserError(f"--cpus {config.cpus} is out of range", hint=f"give 1 to {MAX_CPUS}", status=2)
    for name, path in (("--kernel", config.kernel), ("--initrd", config.initrd)):
        if path is not None and not path.is_file():
            raise UserError(f"{name} {path}: no such file", status=2)


def check_sandbox(config: RunConfig) -> None:
    if config.sandbox.enabled:
        for device, wanted in (("rng", config.rng), ("console", config.virtio_console), ("block", config.blocks)):
            if wanted:
                check_policy(config.sandbox, device)


def check_kvm(device: str) -> None:
    """Refuse hosts whose /dev/kvm cannot run an unmodified kernel, with the way out.

    The loaded KVM module usually tells; only an unknown one is timed, because the first
    guest a process runs pays a large one-off cost when KVM itself is nested (the lab).
    """
    from sandvmm.doctor import classify, kvm_modules

    modules = kvm_modules()
    try:
        kvm.Kvm(device).close()
        if {"kvm_intel", "kvm_amd"} & set(modules):
            mode = "hardware"
        elif "kvm_pvm" in modules:
            mode = "emulated"
        else:
            from sandvmm.main.probe import measure

            mode = classify(modules, measure(200_000, device=device).rate)
    except kvm.KvmUnavailable as error:
        raise UserError(str(error), hint="load kvm_intel or kvm_amd and join the kvm group; see `sandvmm doctor`") from None
    except Exception as error:
        raise UserError(f"{device} cannot run a test guest: {error}", hint="see `sandvmm doctor`") from None
    if mode != "hardware":
        raise UserError("this host's /dev/kvm emulates guests in software and cannot run an unmodified kernel",
                        hint="run sandvmm inside the nested KVM lab: `sandvmm lab -- sandvmm run ...`")


class MarkerFilter:
    """Drops the default guest's own protocol lines (sandvmm-init: ...) from console output.

    Bytes pass through at once unless they could still be the start of a marker line, so
    an interactive prompt is never held back.
    """

    PREFIX = READY_MARKER.split(":")[0].encode() + b": "

    def __init__(self, sink: Callable[[bytes], None]):
        self.sink = sink
        self.pending = b""
        self.at_line_start = True
        self.dropping = False

    def feed(self, data: bytes) -> None:
        out = bytearray()
        for byte in data:
            char = bytes([byte])
            if self.dropping:
                self.dropping = byte != 0x0A
                self.at_line_start = not self.dropping
                continue
            if self.at_line_start or self.pending:
                candidate = self.pending + char
                if self.PREFIX.startswith(candidate):
                    self.pending = candidate
                    self.at_line_start = False
                    if candidate == self.PREFIX:
                        self.pending, self.dropping = b"", True
                    continue
                out += candidate
                self.pending = b""
            else:
                out += char
            self.at_line_start = byte == 0x0A
        if out:
            self.sink(bytes(out))


def _open_output(path: Path | None, option: str) -> int:
    if path is None:
        return sys.stdout.fileno()
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise UserError(f"{option} path={path}: {error.strerror}", status=2) from None


def device_specs(config: RunConfig) -> list[DeviceSpec]:
    """The virtio devices this run asks for, each to run in its own child."""
    specs = block_specs(config.blocks)
    if config.rng:
        from sandvmm.devices.rng.backend import host_entropy
        from sandvmm.devices.rng.core import RngCore

        specs.append(DeviceSpec("rng", RngCore(host_entropy)))
    if config.virtio_console:
        from sandvmm.devices.console.core import ConsoleCore

        from sandvmm.devices.console.backend import input_pump

        fd = _open_output(config.virtio_console_output, "--serial hardware=virtio-console")
        core = ConsoleCore(fd_writer(fd))
        if config.virtio_console_stdin:
            stdin = sys.stdin.fileno()
            specs.append(DeviceSpec("console", core, keep_fds=[fd, stdin], backend_tasks=[input_pump(stdin, core)]))
        else:
            specs.append(DeviceSpec("console", core, keep_fds=[fd]))
    return specs


def _process_start_time() -> float:
    """CLOCK_BOOTTIME seconds at which this process was exec'd, to time boots from our own start."""
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    return start_ticks / os.sysconf("SC_CLK_TCK")


def run(config: RunConfig) -> int:
    check_config(config)
    check_sandbox(config)
    if config.kernel is None:
        from sandvmm.image.store import find_image

        if (image := find_image()) is None:
            from sandvmm.image.build import ensure_image

            image = ensure_image()
        config.kernel = image.vmlinux  # decompressed ahead: the guest need not (boot.py)
        config.initrd = config.initrd or image.initrd
    kernel = read_kernel(config.kernel)
    devices = device_specs(config)  # opens and locks disk images: their errors come before KVM's
    check_kvm(config.kvm_device)
    cmdline = " ".join(filter(None, [kernel_command_line(config.command), root_parameter(config.blocks),
                                     config.params]))

    sink = fd_writer(_open_output(config.serial_output, "--serial"))
    if config.command:
        sink = MarkerFilter(sink).feed

    started = _process_start_time()

    def on_ready() -> None:
        log.info("init reached %.0f ms after sandvmm started", (time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1000)

    install_kick_handler()
    control = _control_socket(config.control_socket) if config.control_socket else None
    try:
        machine = Machine(MachineConfig(kernel, config.initrd, cmdline, config.mem_mib, config.cpus,
                                        devices, config.sandbox), sink, on_ready, config.kvm_device)
        log.info("booting %s: %d vCPU(s), %d MiB", config.kernel, config.cpus, config.mem_mib)
        interactive = not config.command and not config.virtio_console_stdin
        outcome = _supervise(machine, interactive=interactive, control=control)
    finally:
        if control is not None:
            control.close()
            config.control_socket.unlink(missing_ok=True)
    log.info("guest ended (%s) %.0f ms after sandvmm started", outcome.kind,
             (time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1000)
    return _exit_status(outcome)


def _control_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        raise UserError(f"--socket {path} already exists", hint="remove it or choose another path", status=2)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        server.bind(str(path))
    except OSError as error:
        server.close()
        raise UserError(f"--socket {path}: {error.strerror}", status=2) from None
    server.listen(4)
    return server


def _serve_control(server: socket.socket) -> Outcome | None:
    """Answer one control connection; an Outcome when it asked the VM to stop."""
    connection, _ = server.accept()
    with connection:
        connection.settimeout(1)
        try:
            request = protocol.from_msgpack(connection.recv(protocol.MAX_MESSAGE))
        except (protocol.ProtocolError, OSError) as error:
            connection.sendall(protocol.to_msgpack(protocol.Reply(ok=False, error=str(error))))
            return None
        if isinstance(request, protocol.StopVm):
            connection.sendall(protocol.to_msgpack(protocol.Reply(ok=True)))
            return Outcome("stop", detail="stopped through the control socket")
        connection.sendall(protocol.to_msgpack(protocol.Reply(ok=False, error=f"cannot handle {type(request).__name__}")))
        return None


def _supervise(machine: Machine, interactive: bool, control: socket.socket | None = None) -> Outcome:
    """Run the machine until it ends; forward stdin to the serial port when interactive."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_write)
    signals_seen: list[int] = []
    old_handlers = {signum: signal.signal(signum, lambda s, f: signals_seen.append(s))
                    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stdin_fd = sys.stdin.fileno() if interactive and sys.stdin is not None else None
    saved_tty = None
    selector = selectors.DefaultSelector()
    selector.register(wake_read, selectors.EVENT_READ)
    if control is not None:
        selector.register(control, selectors.EVENT_READ)
    try:
        if stdin_fd is not None:
            if os.isatty(stdin_fd):
                saved_tty = termios.tcgetattr(stdin_fd)
                tty.setraw(stdin_fd)
            selector.register(stdin_fd, selectors.EVENT_READ)
        # Woken by the machine's end like by a signal: no polling while the guest runs.
        machine.on_end = lambda: _wake(wake_write)
        machine.start()
        pending = b""  # console input the UART had no room for yet
        while True:
            outcome = machine.wait(0)
            if outcome is not None:
                return outcome
            if signals_seen:
                return Outcome("signal", 128 + signals_seen[0], signal.Signals(signals_seen[0]).name)
            if pending:
                pending = pending[machine.serial.feed(pending):]
                if not pending:
                    selector.register(stdin_fd, selectors.EVENT_READ)
            for key, _ in selector.select(timeout=0.05 if pending else None):
                if key.fd == wake_read:
                    os.read(wake_read, 4096)
                    continue
                if control is not None and key.fd == control.fileno():
                    stopped = _serve_control(control)
                    if stopped is not None:
                        machine.end(stopped)
                    continue
                data = os.read(stdin_fd, 4096)
                pending = data[machine.serial.feed(data):] if data else b""
                if pending or not data:  # stop reading until the guest catches up, or for good at EOF
                    selector.unregister(stdin_fd)
    finally:
        machine.on_end = lambda: None  # the pipe closes below
        machine.stop()
        if saved_tty is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved_tty)
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        selector.close()
        os.close(wake_read)
        os.close(wake_write)


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except OSError:  # full (a wakeup is already pending) or closed (we are done)
        pass


def _exit_status(outcome: Outcome) -> int:
    if outcome.kind == "exit":
        return outcome.status
    if outcome.kind in ("poweroff", "stop"):
        return 0
    if outcome.kind == "reset":
        print(f"sandvmm: the guest rebooted ({outcome.detail}); sandvmm exits on reboot, as crosvm does", file=sys.stderr)
        return 0
    if outcome.kind == "signal":
        print(f"sandvmm: stopped by {outcome.detail}", file=sys.stderr)
        return outcome.status
    if outcome.kind in ("panic", "device"):
        print(f"sandvmm: {outcome.detail}", file=sys.stderr)
        return 1
    print(f"sandvmm: the VM stopped: {outcome.detail}", file=sys.stderr)
    return 1
