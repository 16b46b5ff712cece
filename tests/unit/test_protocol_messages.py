"""The message schema round-trips and refuses what is not one of its messages."""

import msgpack
import pytest

from sandvmm import protocol
from tests.helpers import one_line_error, sandvmm


def test_messages_round_trip():
    for message in (protocol.StopVm(), protocol.Reply(ok=False, error="why")):
        assert protocol.from_msgpack(protocol.to_msgpack(message)) == message


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 99, "type": "StopVm"}),
    msgpack.packb({"v": protocol.VERSION, "type": "Nope"}),
    msgpack.packb({"v": protocol.VERSION, "type": "Reply"}),  # ok is required
])
def test_garbage_is_a_protocol_error(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.from_msgpack(data)


def test_stop_without_a_vm_is_a_one_line_error(tmp_path):
    error = one_line_error(sandvmm("stop", str(tmp_path / "no-vm.sock")))
    assert "cannot reach a VM" in error
