"""`sandvmm lab -- CMD`: run CMD where /dev/kvm is a real kvm_amd.

The lab is QEMU in TCG mode emulating an AMD CPU with SVM and nested paging, booting the
same Debian kernel our guests use. Its stage-one initramfs (lab/init.sh) loads kvm_amd and
9p, then switches into the host's own root filesystem, shared read-only over virtio-9p,
and runs a job script we write into a small read-write share. The job's stdout and stderr
travel back on two virtio-serial ports, so output streams while it runs; its exit status
is a file in that share.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sandvmm.errors import UserError

MIN_MEM_MIB = 1024
LAB_FAILED = 125  # our exit status when the lab itself died, so callers can tell it from the job's
LAB_CPU = "EPYC-v3,+svm,+npt"
# The job sees the host's environment, less what only describes the calling shell.
ENV_SKIPPED = {"PWD", "OLDPWD", "SHLVL", "_"}


@dataclass
class LabConfig:
    command: list[str]
    mem_mib: int = 4096
    # One vCPU by default: with several, TCG races with the lab kernel's live code patching
    # (int3-based static-key updates) and the lab kernel dies with "Oops: int3". KVM flips
    # keys whenever a VM starts or stops, which hold_vm.py stops; the kernel's own flips
    # while it boots remain.
    cpus: int = 1
    rw_dirs: list[Path] = field(default_factory=list)
    timeout: float | None = None
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if not path:
        raise UserError("qemu-system-x86_64 is not installed", hint="apt-get install qemu-system-x86")
    return path


def available_mem_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def check_config(config: LabConfig) -> None:
    if not config.command:
        raise UserError("no command given", hint="usage: sandvmm lab [--mem MiB] [--cpus N] -- CMD ARGS...", status=2)
    if config.mem_mib < MIN_MEM_MIB:
        raise UserError(f"--mem {config.mem_mib} is too little memory for the lab",
                        hint=f"give at least {MIN_MEM_MIB} MiB", status=2)
    free = available_mem_mib()
    if config.mem_mib > free:
        raise UserError(f"--mem {config.mem_mib} is more memory than this host has available ({free} MiB)",
                        hint="give a smaller --mem", status=2)
    if not 1 <= config.cpus <= 64:
        raise UserError(f"--cpus {config.cpus} is out of range", hint="give 1 to 64", status=2)
    for directory in config.rw_dirs:
        if not directory.is_dir():
            raise UserError(f"--rw {directory}: not a directory", status=2)


def job_script(config: LabConfig) -> str:
    lines = ["B=/run/sandvmm-lab/busybox", "JOB=/run/sandvmm-lab/job"]
    for name, value in sorted(config.env.items()):
        if name.isidentifier() and name not in ENV_SKIPPED:
            lines.append(f"export {name}={shlex.quote(value)}")
    lines += [
        # Python cannot write bytecode next to read-only sources; don't make it try.
        "export PYTHONDONTWRITEBYTECODE=1 SANDVMM_IN_LAB=1",
        "exec 0</dev/null 1>/dev/virtio-ports/stdout 2>/dev/virtio-ports/stderr",
    ]
    if config.cpus > 1:  # see sandvmm/lab/hold_vm.py: without it, such labs sometimes oops
        package_root = Path(__file__).resolve().parents[2]
        lines.append(f"PYTHONPATH={shlex.quote(str(package_root))} {shlex.quote(sys.executable)} -m sandvmm.lab.hold_vm")
    lines += [
        f"if cd {shlex.quote(str(config.cwd))}; then",
        f"    {shlex.join(config.command)}",
        "    status=$?",
        "else",
        "    status=126",
        "fi",
        'echo "$status" > "$JOB/status.tmp" && $B mv "$JOB/status.tmp" "$JOB/status"',
        "$B sync",
        "printf '\\0' | $B dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null",
        "$B poweroff -f",
    ]
    return "\n".join(lines) + "\n"


def _share(tag: str, path: Path, readonly: bool) -> list[str]:
    # passthrough keeps host ownership but needs root to create files as others;
    # a rootless lab writes with "none", which stores files as the calling user.
    model = "passthrough" if readonly or os.geteuid() == 0 else "none"
    options = f"local,id={tag},path={path},security_model={model},multidevs=remap"
    if readonly:
        options += ",readonly=on"
    return ["-fsdev", options, "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]


def qemu_command(config: LabConfig, kernel: Path, initrd: Path, job: Path, out_fds: tuple[int, int]) -> list[str]:
    command = [
        qemu_binary(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", LAB_CPU,
        "-m", str(config.mem_mib), "-smp", str(config.cpus),
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 8250.nr_uarts=1",
        "-serial", f"file:{job / 'console.log'}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
        *_share("host", Path("/"), readonly=True),
        *_share("job", job, readonly=False),
        "-device", "virtio-serial-pci",
    ]
    for name, fd in zip(("stdout", "stderr"), out_fds):
        command += ["-chardev", f"file,id={name},path=/proc/self/fd/{fd}",
                    "-device", f"virtserialport,chardev={name},name={name}"]
    for index, directory in enumerate(config.rw_dirs):
        command += _share(f"rw{index}", directory.resolve(), readonly=False)
    return command


def _relay(source: int, target: int) -> None:
    while data := os.read(source, 65536):
        os.write(target, data)
    os.close(source)


def run(config: LabConfig) -> int:
    """Run the job in the lab; returns its exit status."""
    from sandvmm.image.build import ensure_image

    check_config(config)
    qemu_binary()
    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="sandvmm-lab-") as tmp:
        job = Path(tmp)
        (job / "job.sh").write_text(job_script(config))
        (job / "mounts").write_text("".join(f"rw{i} {d.resolve()}\n" for i, d in enumerate(config.rw_dirs)))
        pipes = [os.pipe() for _ in range(2)]
        command = qemu_command(config, image.kernel, image.lab_initrd, job, (pipes[0][1], pipes[1][1]))
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, pass_fds=[w for _, w in pipes])
        for _, write_end in pipes:
            os.close(write_end)
        relays = [threading.Thread(target=_relay, args=(read_end, target), daemon=True)
                  for (read_end, _), target in zip(pipes, (sys.stdout.fileno(), sys.stderr.fileno()))]
        for relay in relays:
            relay.start()
        try:
            qemu_output = process.communicate(timeout=config.timeout)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise UserError(f"the lab job did not finish within {config.timeout:g} s and was killed") from None
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait()
            for relay in relays:
                relay.join(timeout=5)
        status_file = job / "status"
        if status_file.exists():
            return int(status_file.read_text())
        console = (job / "console.log").read_text(errors="replace") if (job / "console.log").exists() else ""
        kept = Path(tempfile.mkstemp(prefix="sandvmm-lab-console-", suffix=".log")[1])
        kept.write_text(qemu_output + console)
        last = [line for line in (qemu_output + console).splitlines() if line.strip()][-3:]
        raise UserError("the lab ended without reporting the job's exit status: " + " | ".join(last),
                        hint=f"its console log is {kept}", status=LAB_FAILED)
