"""The client side of the VM control socket (`sandvmm stop PATH`)."""

from __future__ import annotations

import socket
from pathlib import Path

from sandvmm import protocol
from sandvmm.errors import UserError


def request(path: Path, message) -> protocol.Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as client:
        client.settimeout(5)
        try:
            client.connect(str(path))
            client.sendall(protocol.to_msgpack(message))
            reply = protocol.from_msgpack(client.recv(protocol.MAX_MESSAGE))
        except OSError as error:
            raise UserError(f"cannot reach a VM at {path}: {error.strerror or error}",
                            hint="is `sandvmm run --socket` running?") from None
        except protocol.ProtocolError as error:
            raise UserError(f"{path} answered something that is not sandvmm's protocol: {error}") from None
    if not isinstance(reply, protocol.Reply):
        raise UserError(f"{path} answered with {type(reply).__name__}, not a reply")
    return reply


def stop_vm(path: Path) -> None:
    reply = request(path, protocol.StopVm())
    if not reply.ok:
        raise UserError(f"the VM at {path} refused to stop: {reply.error}")
