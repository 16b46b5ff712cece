import base64
import shlex

import pytest

from sandvmm.errors import UserError
from sandvmm.guest.protocol import COMMAND_PARAM, kernel_command_line, status_from_debug_exit


def test_command_round_trips_through_the_kernel_command_line():
    command = ["sh", "-c", "echo 'a b' \"$HOME\"; exit 3"]
    line = kernel_command_line(command)
    words = line.split()
    encoded = next(word for word in words if word.startswith(COMMAND_PARAM + "="))
    assert shlex.split(base64.b64decode(encoded.split("=", 1)[1]).decode()) == command


def test_no_command_means_no_parameter():
    assert COMMAND_PARAM not in kernel_command_line([])


def test_a_command_too_long_for_the_kernel_is_refused():
    with pytest.raises(UserError, match="too long"):
        kernel_command_line(["echo", "x" * 3000])


@pytest.mark.parametrize("status", [0, 1, 7, 255])
def test_debug_exit_status_decoding(status):
    assert status_from_debug_exit((status << 1) | 1) == status


def test_qemu_exiting_on_its_own_is_not_a_guest_status():
    assert status_from_debug_exit(0) is None
