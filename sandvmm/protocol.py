"""The msgpack message schema: every message any sandvmm process sends another is defined here.

Messages are small dataclasses with explicit `to_msgpack`/`from_msgpack`. On the wire each
is a msgpack map carrying the schema version and the message type, so a peer speaking
another version, or sending garbage, gets a clear ProtocolError instead of a crash.

Channels (docs/protocol.md has the whole picture):
- the VM control socket (`sandvmm run --socket PATH`, `sandvmm stop PATH`);
- per device child, three SOCK_SEQPACKET socketpairs, separated by privilege:
  config (main asks, the device answers: configuration space and BAR accesses),
  irq (the device asks main to route its interrupt vectors),
  memory (the device asks main to wire guest memory events to it: ioeventfds).
File descriptors travel alongside a message as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, fields

import msgpack

VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 64


class ProtocolError(ValueError):
    pass


_MESSAGES: dict[str, type] = {}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # every config-space exit packs two messages: no fields() then


def message(cls):
    """Register a dataclass as a message type under its class name."""
    cls = dataclass(frozen=True)(cls)
    _MESSAGES[cls.__name__] = cls
    _FIELD_NAMES[cls] = tuple(field.name for field in fields(cls))
    return cls


def to_msgpack(msg) -> bytes:
    # Shallow: field values are plain ints, bytes, strings and lists of them.
    body = {name: getattr(msg, name) for name in _FIELD_NAMES[type(msg)]}
    return msgpack.packb({"v": VERSION, "type": type(msg).__name__, **body})


def from_msgpack(data: bytes):
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for malformed input
        raise ProtocolError(f"not a msgpack message: {error}") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise ProtocolError(f"unsupported message (expected a map with v={VERSION})")
    cls = _MESSAGES.get(raw.get("type"))
    if cls is None:
        raise ProtocolError(f"unknown message type {raw.get('type')!r}")
    names = _FIELD_NAMES[cls]
    try:
        return cls(**{key: value for key, value in raw.items() if key in names})
    except TypeError as error:
        raise ProtocolError(f"malformed {cls.__name__}: {error}") from None


@message
class StopVm:
    """Ask a running VM to stop (crosvm's `stop` command)."""


@message
class Reply:
    ok: bool
    error: str = ""


def scm_rights(fds) -> tuple[int, int, bytes]:
    """The ancillary-data item that passes `fds` along with a message."""
    return socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()


def send(sock: socket.socket, msg, fds: list[int] = ()) -> None:
    """One message per datagram; fds go with it as SCM_RIGHTS."""
    data = to_msgpack(msg)
    if fds:
        sock.sendmsg([data], [scm_rights(fds)])
    else:
        sock.send(data)


def receive(sock: socket.socket):
    """(message, fds) from one datagram; EOFError when the peer has gone."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[:len(payload) - len(payload) % 4])
    if not data and not ancillary:
        raise EOFError("the peer closed the channel")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message or its file descriptors truncated")
    return from_msgpack(data), fds


def call(sock: socket.socket, msg, fds: list[int] = ()):
    """Send a request and wait for its reply; a Reply(ok=False) raises ProtocolError."""
    send(sock, msg, fds)
    reply, reply_fds = receive(sock)
    for fd in reply_fds:
        os.close(fd)
    if isinstance(reply, Reply) and not reply.ok:
        raise ProtocolError(reply.error)
    return reply


# --- config channel: main asks, the device child answers ---------------------------------

@message
class ConfigRead:
    register: int
    size: int


@message
class ConfigWrite:
    """Answered with HeaderState, to refresh main's mirror."""
    register: int
    data: bytes


@message
class BarRead:
    bar: int
    offset: int
    size: int


@message
class BarWrite:
    """Answered with HeaderState: a BAR write (the driver's status) can change what is volatile."""
    bar: int
    offset: int
    data: bytes


@message
class Data:
    """The answer to a read."""
    data: bytes


@message
class HeaderState:
    """The answer to a write: the configuration header now, and its volatile registers now."""
    header: bytes
    volatile: list  # [[register, length], ...]


# --- irq channel: the device asks main ------------------------------------------------------

@message
class RegisterIrqfds:
    """fds: one eventfd per MSI-X vector, then the INTx eventfd and its resample eventfd."""
    vectors: int


@message
class SetMsiRoute:
    """The guest programmed MSI-X table entry `vector`: route its eventfd to that message."""
    vector: int
    address: int
    data: int


# --- memory channel: the device asks main ---------------------------------------------------

@message
class RegisterIoevents:
    """fds: one eventfd per offset; main has KVM signal it on guest writes at BAR `bar` + offset."""
    bar: int
    offsets: list
    length: int  # bytes per write (2 for virtio queue notifications)
