"""The default guest under QEMU-KVM: the peer that sandvmm's tests and benchmarks compare against.

It needs a /dev/kvm that runs guests at hardware speed, so on hosts without VT-x/AMD-V it
runs inside the lab: `sandvmm lab -- sandvmm peer -- CMD`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from sandvmm.errors import UserError
from sandvmm.guest.protocol import STATUS_PORT, kernel_command_line, status_from_debug_exit
from sandvmm.lab.runner import qemu_binary

MACHINES = {
    # microvm without the legacy parts a direct-booted Linux does not need.
    "microvm": "microvm,x-option-roms=off,rtc=off,pic=off,pit=on,isa-serial=on",
    "q35": "q35",
}


@dataclass
class PeerConfig:
    command: list[str]
    machine: str = "microvm"
    mem_mib: int = 512
    cpus: int = 1
    extra: list[str] = field(default_factory=list)


def qemu_command(config: PeerConfig, kernel: str, initrd: str) -> list[str]:
    return [
        qemu_binary(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", MACHINES[config.machine], "-accel", "kvm", "-cpu", "host",
        "-m", str(config.mem_mib), "-smp", str(config.cpus),
        "-kernel", kernel, "-initrd", initrd, "-append", kernel_command_line(config.command),
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-device", f"isa-debug-exit,iobase={STATUS_PORT:#x},iosize=1",
    ]


def run(config: PeerConfig) -> int:
    from sandvmm.image.build import ensure_image

    image = ensure_image(config.extra)
    status = subprocess.run(qemu_command(config, str(image.kernel), str(image.initrd))).returncode
    guest_status = status_from_debug_exit(status)
    if guest_status is None:
        raise UserError(f"QEMU exited with status {status} before the guest reported one")
    return guest_status
