"""A small ACPI Machine Language (AML) encoder for the DSDT.

Each helper returns the encoded bytes of one AML term (ACPI 6.5, chapter 20), so a
definition block is just concatenation:

    device("PCI0",
           name("_HID", eisa_id("PNP0A08")),
           name("_CRS", resource_template(word_bus_number(0, 0xFF))))

Values given to `name`, `package` and `return_` may be Python ints (encoded as the
smallest integer constant), strs (AML String objects) or bytes (an already encoded term,
e.g. `name_string("\\_SB.LNKA")` for a reference). `iasl -d` must disassemble the output
cleanly; tests/unit/test_acpi.py checks that.
"""

from __future__ import annotations

import struct

ZERO_OP, ONE_OP, ONES_OP = b"\x00", b"\x01", b"\xff"
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP, RETURN_OP = 0x08, 0x10, 0x11, 0x12, 0x14, 0xA4
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F

Value = int | str | bytes


def pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of body_length bytes; the encoded length counts itself too."""
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            # Lead byte: bits 7-6 = number of following bytes, bits 3-0 = low nibble.
            return bytes([extra << 6 | total & 0xF]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package too long: {body_length} bytes")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def name_seg(segment: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not 1 <= len(segment) <= 4:
        raise ValueError(f"AML name segment must be 1-4 characters: {segment!r}")
    padded = segment.upper().ljust(4, "_")
    if not (padded[0].isalpha() or padded[0] == "_") or not all(
        c.isdigit() or c == "_" or "A" <= c <= "Z" for c in padded
    ):
        raise ValueError(f"invalid AML name segment: {segment!r}")
    return padded.encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString such as "_S5", "\\_SB.PCI0" or "^^FOO.BAR"."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX]), path[1:]
    segments = [name_seg(s) for s in path.split(".")] if path else []
    if not segments:
        return prefix + b"\x00"  # NullName
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer (DSDT revision 2: 64-bit integers)."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integer out of range: {value}")
    if value == 0:
        return ZERO_OP
    if value == 1:
        return ONE_OP
    if value == (1 << 64) - 1:
        return ONES_OP
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    if "\0" in text or not text.isascii():
        raise ValueError(f"AML strings are NUL-terminated ASCII: {text!r}")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(pnp_id: str) -> bytes:
    """A compressed EISA ID such as "PNP0A08", as ASL's EisaId() emits it (a DWordConst)."""
    if len(pnp_id) != 7 or not pnp_id[:3].isalpha() or not pnp_id[:3].isupper():
        raise ValueError(f"EISA ID must be three capital letters and four hex digits: {pnp_id!r}")
    a, b, c = (ord(ch) - 0x40 for ch in pnp_id[:3])  # 5 bits per letter, 'A' = 1
    product = int(pnp_id[3:], 16)
    # The letters form a big-endian 16-bit word, then the product number in byte order.
    raw = bytes([a << 2 | b >> 3, (b << 5 | c) & 0xFF, product >> 8, product & 0xFF])
    return bytes([DWORD_PREFIX]) + raw


def _value(value: Value) -> bytes:
    if isinstance(value, bool):
        raise TypeError("use 0/1, not bool, for AML integers")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


def name(path: str, value: Value) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + _value(value)


def package(*elements: Value) -> bytes:
    """Package(){elements...}."""
    if len(elements) > 0xFF:
        raise ValueError("Package() holds at most 255 elements (VarPackage is not implemented)")
    body = bytes([len(elements)]) + b"".join(_value(e) for e in elements)
    return _with_pkg_length(bytes([PACKAGE_OP]), body)


def buffer(data: bytes) -> bytes:
    """Buffer(){data}."""
    body = integer(len(data)) + data
    return _with_pkg_length(bytes([BUFFER_OP]), body)


def scope(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise ValueError("AML methods take 0-7 arguments")
    flags = args | (0x08 if serialized else 0)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return _with_pkg_length(bytes([METHOD_OP]), body)


def return_(value: Value) -> bytes:
    return bytes([RETURN_OP]) + _value(value)


# --- Resource descriptors (ACPI 6.5 section 6.4), for _CRS buffers ---------------------

ADDRESS_MEMORY, ADDRESS_IO, ADDRESS_BUS = 0, 1, 2
# General flags: _MIF | _MAF (fixed window) with bit 0 clear, i.e. "produced and consumed"
# by this device -- what a host bridge declares for the windows it forwards.
_FIXED_PRODUCER = 0x0C
_IO_RANGE_ENTIRE = 0x03  # _RNG: ISA and non-ISA ranges
# Memory type flags: bit 0 = read-write; bits 2-1 (_MEM) = 0 non-cacheable, 3 prefetchable.
_MEM_READ_WRITE, _MEM_PREFETCHABLE = 0x01, 0x06


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """IO(Decode16, base, base, alignment, length): a fixed small I/O port range."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, alignment, length)


def _address_space(tag: int, fmt: str, resource_type: int, type_flags: int,
                   minimum: int, maximum: int) -> bytes:
    """A Word/DWord/QWord Address Space Descriptor for a fixed [minimum, maximum] window."""
    if maximum < minimum:
        raise ValueError(f"empty resource range {minimum:#x}-{maximum:#x}")
    # Granularity 0, then _MIN, _MAX, _TRA (no translation) and _LEN.
    fields = struct.pack("<" + fmt * 5, 0, minimum, maximum, 0, maximum - minimum + 1)
    flags = _FIXED_PRODUCER
    header = struct.pack("<BHBBB", tag, 3 + len(fields), resource_type, flags, type_flags)
    return header + fields


def word_bus_number(first: int, last: int) -> bytes:
    return _address_space(0x88, "H", ADDRESS_BUS, 0, first, last)


def word_io(minimum: int, maximum: int) -> bytes:
    return _address_space(0x88, "H", ADDRESS_IO, _IO_RANGE_ENTIRE, minimum, maximum)


def _memory_flags(prefetchable: bool) -> int:
    return _MEM_READ_WRITE | (_MEM_PREFETCHABLE if prefetchable else 0)


def dword_memory(minimum: int, maximum: int, prefetchable: bool = False) -> bytes:
    return _address_space(0x87, "I", ADDRESS_MEMORY, _memory_flags(prefetchable), minimum, maximum)


def qword_memory(minimum: int, maximum: int, prefetchable: bool = False) -> bytes:
    return _address_space(0x8A, "Q", ADDRESS_MEMORY, _memory_flags(prefetchable), minimum, maximum)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){descriptors}: a Buffer ending in an End Tag (checksum 0 = none)."""
    return buffer(b"".join(descriptors) + b"\x79\x00")
