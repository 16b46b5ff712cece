"""The msgpack message schema: every message any sandvmm process sends another is defined here.

Messages are small dataclasses with explicit `to_msgpack`/`from_msgpack`. On the wire each
is a msgpack map carrying the schema version and the message type, so a peer speaking
another version, or sending garbage, gets a clear ProtocolError instead of a crash.

Today: the VM control socket (`sandvmm run --socket PATH`, `sandvmm stop PATH`). The device
control channels join this module with the process-per-device work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import msgpack

VERSION = 1
MAX_MESSAGE = 64 * 1024


class ProtocolError(ValueError):
    pass


_MESSAGES: dict[str, type] = {}


def message(cls):
    """Register a dataclass as a message type under its class name."""
    cls = dataclass(frozen=True)(cls)
    _MESSAGES[cls.__name__] = cls
    return cls


def to_msgpack(msg) -> bytes:
    return msgpack.packb({"v": VERSION, "type": type(msg).__name__, **asdict(msg)})


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
    names = {field.name for field in fields(cls)}
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
