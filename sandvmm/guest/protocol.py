"""What the default guest's init (guest/init.sh) and a VMM booting it agree on."""

from __future__ import annotations

import base64
import shlex

from sandvmm.errors import UserError

COMMAND_PARAM = "sandvmm.cmd"  # base64 of the shell command line init runs
STATUS_PORT = 0xF4  # init writes the command's exit status here, one byte
READY_PORT = 0xF5  # init writes any byte here as its first act: the boot timer's mark
READY_MARKER = "sandvmm-init: ready"
EXIT_MARKER = "sandvmm-init: exit"
# no_timer_check: under a loaded or nested host the kernel's IO-APIC timer check can miss
# its deadline and panic with "IO-APIC + timer doesn't work!"; a VM's timer is known good.
BASE_PARAMS = "console=ttyS0 quiet panic=-1 no_timer_check"
CMDLINE_MAX = 2048  # COMMAND_LINE_SIZE on x86


def kernel_command_line(command: list[str], params: str = BASE_PARAMS) -> str:
    """The kernel command line that makes init run `command` (a shell when it is empty)."""
    line = params
    if command:
        encoded = base64.b64encode(shlex.join(command).encode()).decode()
        line += f" {COMMAND_PARAM}={encoded}"
    if len(line) >= CMDLINE_MAX:
        raise UserError(f"the guest command is too long for the kernel command line ({len(line)} bytes)",
                        hint=f"keep it under about {CMDLINE_MAX * 3 // 4 - len(params)} characters", status=2)
    return line


def status_from_debug_exit(qemu_status: int) -> int | None:
    """QEMU's isa-debug-exit makes QEMU exit with (value << 1) | 1; None when init never wrote."""
    return qemu_status >> 1 if qemu_status & 1 else None
