"""The split virtqueue (virtio 1.2, section 2.7), device side, sans-I/O.

Pure parsing and state over guest RAM: no syscalls, no eventfds, no interrupts. A device's
trio loop calls `pop()` when kicked, hands the `Chain` to its core, calls `add_used()` and
raises the interrupt when `needs_interrupt()` says so.

Everything in the rings and descriptors is guest-controlled and may change under us at
any time, so every value is read once (one `unpack_from` per descriptor, or per indirect
table read whole), checked, and only then used. `GuestError` is the only exception that
leaves this module for anything the guest controls.

Guest memory is any object with `slice(address, length) -> memoryview` that raises
`sandvmm.memory.GuestMemoryError` for a range that is not entirely RAM.

Memory ordering: the driver runs on other CPUs. CPython gives us no barriers, so this
relies on x86-64's ordering (loads are not reordered with loads, stores not with stores)
for "avail idx before ring entries" and "used element before used idx". The one
reordering x86 does make, a later load passing an earlier store, matters where we write
a notification setting and then read the driver's state; `full_barrier()` covers it.
"""

from __future__ import annotations

import re
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from sandvmm.memory import GuestMemoryError

MAX_QUEUE_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
DESCRIPTOR_SIZE = DESCRIPTOR.size
USED_ELEMENT = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")

DESCRIPTOR_TABLE_ALIGNMENT = 16
DRIVER_AREA_ALIGNMENT = 2
DEVICE_AREA_ALIGNMENT = 4

ADDRESS_LIMIT = 1 << 64
# used.len is 32 bits, so a chain's total must fit there (the spec allows 2^32 exactly;
# one byte less keeps every count we report representable).
MAX_CHAIN_BYTES = (1 << 32) - 1

_unpack_descriptor = DESCRIPTOR.unpack_from
_unpack_u16 = U16.unpack_from

# From how many entries an indirect table is checked in bulk. The bulk path costs about
# 2 µs more than walking a 3-entry table, and overtakes the walk at some 26 entries
# (pop() timed on the development machine): a 1 MiB request's up to 256 entries take it;
# shorter tables are walked, except the 3-entry one, which has a reader of its own.
BULK_TABLE_BYTES = 28 * DESCRIPTOR_SIZE

# The ordinary indirect table, as Linux writes one: entry i links to i + 1, readable
# buffers first, no nested table. Checked in bulk over each entry's flags & 7, one byte
# per entry: readable+NEXT (1)..., then a readable last (0), or writable+NEXT (3)... and
# a writable last (2). Any INDIRECT bit (4..7) does not match.
_FLAG_BITS = bytes(value & 7 for value in range(256))
_ORDINARY_FLAGS = re.compile(rb"\x01*(?:\x00|\x03*\x02)")

_unpack_three_descriptors = struct.Struct("<" + "QIHH" * 3).unpack_from
THREE_DESCRIPTORS_BYTES = 3 * DESCRIPTOR_SIZE


def descriptor_table_size(size: int) -> int:
    return DESCRIPTOR_SIZE * size


def driver_area_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def device_area_size(size: int) -> int:
    """flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


_barrier_lock = threading.Lock()
_barrier_acquire = _barrier_lock.acquire
_barrier_release = _barrier_lock.release


def full_barrier() -> None:
    """A full memory fence (store-load included).

    Taking a lock is an atomic read-modify-write (a `lock`-prefixed instruction on x86),
    which orders every earlier store before every later load; Python has no fence of
    its own.
    """
    _barrier_acquire()
    _barrier_release()


class GuestError(Exception):
    """The guest broke a virtqueue rule.

    `head` is the chain's head index when the error concerns one chain that has been
    taken off the ring: the device completes it (`add_used(head, 0)`, or an error status
    where it can) and carries on. `head` is None when the ring itself is unusable: the
    device sets DEVICE_NEEDS_RESET and raises a configuration interrupt.
    """

    def __init__(self, message: str, head: int | None = None):
        super().__init__(message)
        self.head = head


@dataclass
class QueueConfig:
    """A queue as the driver programmed it through the transport (guest-physical)."""

    size: int
    descriptor_table: int
    driver_area: int  # the available ring
    device_area: int  # the used ring


class Chain:
    """One descriptor chain: zero-copy views of the guest's buffers.

    `readable` views are read-only (the device must not write the driver's requests);
    `writable` ones are where replies go. Views stay valid as long as guest RAM is
    mapped; the guest may change their contents at any time, so read each byte once.
    """

    __slots__ = ("head", "readable", "writable", "readable_length", "writable_length")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_length: int, writable_length: int):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_length = readable_length
        self.writable_length = writable_length

    @classmethod
    def of_three(cls, head: int, first: memoryview, second: memoryview, second_is_writable: bool,
                 third: memoryview) -> Chain:
        """The chain of three buffers, the first readable and the third writable."""
        if second_is_writable:
            return cls(head, [first], [second, third], len(first), len(second) + len(third))
        return cls(head, [first, second], [third], len(first) + len(second), len(third))

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={[len(v) for v in self.readable]}, "
                f"writable={[len(v) for v in self.writable]})")

    def read(self, limit: int | None = None, offset: int = 0) -> bytes:
        """Gather up to `limit` bytes of the readable part, starting `offset` bytes in."""
        readable = self.readable
        if offset == 0 and (limit is None or limit >= self.readable_length):
            if len(readable) == 1:
                return bytes(readable[0])
            return b"".join(readable)
        return b"".join(_window(readable, offset, limit))

    def write(self, data, offset: int = 0) -> int:
        """Scatter `data` into the writable part from `offset`; returns bytes written.

        Writes stop at the end of the writable buffers: what does not fit is dropped
        (the count says how much did).
        """
        source = memoryview(data)
        if source.format != "B" or source.ndim != 1:
            source = source.cast("B")
        total = len(source)
        writable = self.writable
        if offset == 0 and len(writable) == 1:  # the common case: one reply buffer
            target = writable[0]
            count = min(total, len(target))
            target[:count] = source[:count]
            return count
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        written = 0
        for view in writable:
            length = len(view)
            if offset >= length:
                offset -= length
                continue
            count = min(length - offset, total - written)
            view[offset:offset + count] = source[written:written + count]
            written += count
            offset = 0
            if written == total:
                break
        return written

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views covering readable bytes [offset, offset+length): for os.pwritev and the like."""
        return _window(self.readable, offset, length)

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views covering writable bytes [offset, offset+length): for os.preadv and the like."""
        return _window(self.writable, offset, length)


def _window(views: list[memoryview], offset: int, length: int | None) -> list[memoryview]:
    """The parts of a scatter list that cover [offset, offset+length)."""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    result = []
    remaining = -1 if length is None else length
    for view in views:
        if remaining == 0:
            break
        size = len(view)
        if offset >= size:
            offset -= size
            continue
        end = size if remaining < 0 else min(size, offset + remaining)
        result.append(view[offset:end] if offset or end != size else view)
        if remaining > 0:
            remaining -= end - offset
        offset = 0
    return result


class SplitQueue:
    """The device's side of one split virtqueue.

    `event_idx` and `indirect` say whether VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC
    were negotiated. `last_available`/`next_used` give where the ring stands when a
    device process takes over a running queue (restore, restart); a fresh queue is 0/0.
    Raises GuestError(head=None) if the configuration is unusable.

    Notifications start enabled. A device serves a queue on each kick with `serve()`,
    or by hand:

        queue.set_notifications(False)   # optional: fewer kicks while we drain
        while (chain := queue.pop()) is not None: ...handle, add_used...
        queue.set_notifications(True)
        if queue.has_available(): ...drain again

    The re-check after re-enabling is required: a driver that published a buffer
    before it could see notifications re-enabled will not kick, and nobody would pop
    that buffer. With EVENT_IDX, `pop()`, `serve()` and `has_available()` do this
    re-check themselves when they find the ring empty with notifications enabled, so a
    plain "pop until None" loop is safe.
    """

    def __init__(self, memory, config: QueueConfig, *, event_idx: bool, indirect: bool,
                 last_available: int = 0, next_used: int = 0):
        size = config.size
        if not (isinstance(size, int) and 1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise GuestError(f"queue size {size} is not a power of two from 1 to {MAX_QUEUE_SIZE}")
        areas = (("descriptor table", config.descriptor_table, descriptor_table_size(size),
                  DESCRIPTOR_TABLE_ALIGNMENT),
                 ("driver area", config.driver_area, driver_area_size(size), DRIVER_AREA_ALIGNMENT),
                 ("device area", config.device_area, device_area_size(size), DEVICE_AREA_ALIGNMENT))
        views = []
        for name, address, length, alignment in areas:
            if not 0 <= address <= ADDRESS_LIMIT - length:
                raise GuestError(f"queue {name} at {address:#x} overflows the address space")
            if address % alignment:
                raise GuestError(f"queue {name} at {address:#x} is not {alignment}-byte aligned")
            try:
                views.append(memory.slice(address, length))
            except GuestMemoryError as error:
                raise GuestError(f"queue {name} at {address:#x}+{length:#x} is not in RAM") from error
        self._descriptors, self._avail, self._used = views
        # What we store in the device area, as typed views. An item store is one machine
        # store; struct.pack_into zeroes its bytes before writing them, and the driver, on
        # another CPU, can read that zero: a used idx of 0 publishes entries of an earlier
        # lap ("id N is not a head!" in Linux, seen in 2-vCPU labs).
        used_ring_end = 4 + 8 * size
        self._used_flags = self._used[0:2].cast("H")
        self._used_idx = self._used[2:4].cast("H")
        self._used_elements = self._used[4:used_ring_end].cast("I")  # id, len; id, len; ...
        self._avail_event = self._used[used_ring_end:used_ring_end + 2].cast("H")
        self.memory = memory
        # Guest RAM from 0 as plain views, for slicing buffers without a call per buffer:
        # any memory that offers them (GuestMemory does), else none (an end no buffer is below).
        identity_views = getattr(memory, "identity_views", None)
        self._ram_end, self._ram, self._ram_readonly = (identity_views() if identity_views
                                                        else (-1, memoryview(b""), memoryview(b"")))
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._mask = size - 1
        self._used_event_offset = 4 + 2 * size  # in the driver area
        self._last_available = last_available & 0xFFFF
        self._next_used = next_used & 0xFFFF
        self._signalled_used = self._next_used  # used idx when needs_interrupt last ran
        self._notifications = True
        self._publish_notification_state()

    @property
    def last_available(self) -> int:
        """Our position in the available ring (16-bit, wraps)."""
        return self._last_available

    @property
    def next_used(self) -> int:
        """The used idx we will publish next (16-bit, wraps)."""
        return self._next_used

    def _pending(self) -> int:
        """Published chains not yet popped; reads the avail idx once."""
        available = _unpack_u16(self._avail, 2)[0]
        pending = (available - self._last_available) & 0xFFFF
        if pending > self.size:
            raise GuestError(f"available idx {available} is {pending} entries ahead of "
                             f"{self._last_available} in a queue of {self.size}")
        return pending

    def has_available(self) -> bool:
        """Whether the driver has published chains we have not popped. Finding none, it
        asks for a kick on the next one, as `pop()` and `serve()` do: a device that stops
        serving on this answer must get that kick."""
        return self._available() != 0

    def pop(self) -> Chain | None:
        """The next available chain, or None.

        Raises GuestError: with head=None if the ring is unusable (available idx too
        far ahead, head index out of range); with the head if that chain is malformed
        (it is consumed, so the next pop() moves on).
        """
        if not self._available():
            return None
        return self._chain(self._take_head())

    def serve(self, handle: Callable[[Chain], int], *, more: Callable[[], bool] | None = None,
              handle_three: Callable[[memoryview, memoryview, bool, memoryview], int | None] | None = None) -> int:
        """Complete available chains while `more()` holds (when given), each with the byte
        count its handler says it wrote into it; returns how many were completed.

        A malformed chain is completed with 0 bytes and the queue goes on; a broken ring
        (GuestError without a head) propagates.

        `handle_three`, when given, is offered first every chain that is one ordinary
        indirect table of three entries in low RAM, as its buffers' views (the first
        read-only, the last writable) and whether the middle one is writable; it returns
        None for a chain it leaves to `handle`. That is every virtio-blk request of one
        buffer (header, data, status: 4 KiB random I/O), and this loop is its data path:
        the table is read with one unpack and checked whole, inline, and no Chain is made.
        Ordinary means what `_ordinary_table` says (entries linked in order, no nested
        table, readable before writable); anything else is walked, which finds and words
        every error.
        """
        completed = pending = 0
        offer_three = handle_three is not None and self.indirect
        descriptors, ram_end, ram, readonly = self._descriptors, self._ram_end, self._ram, self._ram_readonly
        three_end = ram_end - THREE_DESCRIPTORS_BYTES
        while more is None or more():
            if not pending:
                pending = self._available()  # one read of the avail idx per batch
                if not pending:
                    break
            pending -= 1
            head = self._take_head()
            written = None
            if offer_three:
                table, length, flags, _ = _unpack_descriptor(descriptors, head << 4)
                if (length == THREE_DESCRIPTORS_BYTES and table <= three_end
                        and flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT) == VIRTQ_DESC_F_INDIRECT):
                    (address0, length0, flags0, next0, address1, length1, flags1, next1,
                     address2, length2, flags2, _) = _unpack_three_descriptors(readonly, table)
                    end0, end1, end2 = address0 + length0, address1 + length1, address2 + length2
                    # Entry 0 readable, entry 2 writable, entry 1 either; none INDIRECT.
                    if (next0 == 1 and next1 == 2 and flags0 & 7 == VIRTQ_DESC_F_NEXT
                            and flags1 & 5 == VIRTQ_DESC_F_NEXT and flags2 & 7 == VIRTQ_DESC_F_WRITE
                            and end0 <= ram_end and end1 <= ram_end and end2 <= ram_end
                            and length0 + length1 + length2 <= MAX_CHAIN_BYTES):
                        second_is_writable = flags1 & VIRTQ_DESC_F_WRITE != 0
                        buffers = (readonly[address0:end0], (ram if second_is_writable else readonly)[address1:end1],
                                   second_is_writable, ram[address2:end2])
                        written = handle_three(*buffers)
                        if written is None:
                            written = handle(Chain.of_three(head, *buffers))
            if written is None:
                try:
                    chain = self._chain(head)
                except GuestError as error:
                    if error.head is None:
                        raise
                    written = 0
                else:
                    written = handle(chain)
            self._publish_used(head, written)
            completed += 1
        return completed

    def _available(self) -> int:
        """Published chains not yet popped; with EVENT_IDX and notifications on, finding
        none first asks for a kick on the next one and looks again (see the class docstring)."""
        pending = self._pending()
        if pending or not (self.event_idx and self._notifications):
            return pending
        self._avail_event[0] = self._last_available
        full_barrier()
        return self._pending()

    def _take_head(self) -> int:
        """The head of the next available chain, which is then consumed."""
        slot = self._last_available & self._mask
        head = _unpack_u16(self._avail, 4 + 2 * slot)[0]
        self._last_available = (self._last_available + 1) & 0xFFFF
        if head >= self.size:
            raise GuestError(f"available ring slot {slot} names descriptor {head}, "
                             f"beyond the queue size {self.size}")
        return head

    def _chain(self, head: int) -> Chain:
        """Chain `head`, from a long indirect table read in bulk if it is ordinary, else walked."""
        if self.indirect:
            # Linux puts every request behind one indirect table, in low RAM.
            address, length, flags, _ = _unpack_descriptor(self._descriptors, head << 4)
            if (flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT) == VIRTQ_DESC_F_INDIRECT
                    and BULK_TABLE_BYTES <= length <= self.size << 4 and not length & 15
                    and address + length <= self._ram_end):
                chain = self._ordinary_table(head, self._ram_readonly[address:address + length], length >> 4)
                if chain is not None:
                    return chain
        try:
            return self._walk(head)
        except GuestMemoryError as error:
            raise GuestError(f"chain {head}: {error}", head) from error
        except struct.error as error:  # a table shorter than we computed: not expected
            raise GuestError(f"chain {head}: {error}", head) from error

    def _ordinary_table(self, head: int, table: memoryview, count: int) -> Chain | None:
        """The chain in an indirect table of `count` entries that is the whole chain, if
        the table is ordinary; else None.

        The data path (Linux puts every request behind one indirect table): the table is
        read and checked in bulk, a few C-level passes over it instead of Python work per
        descriptor. Ordinary means: entries linked in order, readable buffers first, no
        nested table, nothing the walk would refuse, and every buffer in low RAM, which is
        sliced straight from views of all of it. Anything else returns None and pop()
        walks the chain from its head, reading the table again one entry at a time (so
        errors are found, and worded, in one place); each path acts only on what it read.
        """
        kinds = table[12::16].tobytes().translate(_FLAG_BITS)
        if not _ORDINARY_FLAGS.fullmatch(kinds):
            return None
        if table.cast("H")[7:(count - 1) << 3:8].tolist() != list(range(1, count)):
            return None
        addresses = table.cast("Q")[::2].tolist()
        lengths = table.cast("I")[2::4].tolist()
        # max + max bounds every address + length: a table that fails this (a large
        # buffer and a buffer near the end of low RAM, or any in high RAM) is not lost,
        # only walked the general way.
        if max(addresses) > self._ram_end - max(lengths):
            return None
        readable_count = kinds.count(1) + kinds.count(0)
        readable_length = sum(lengths[:readable_count])
        writable_length = sum(lengths[readable_count:])
        if readable_length + writable_length > MAX_CHAIN_BYTES:
            return None
        ram = self._ram_readonly
        readable = [ram[start:start + size] for start, size
                    in zip(addresses[:readable_count], lengths[:readable_count])]
        ram = self._ram
        writable = [ram[start:start + size] for start, size
                    in zip(addresses[readable_count:], lengths[readable_count:])]
        return Chain(head, readable, writable, readable_length, writable_length)

    def _walk(self, head: int) -> Chain:
        """Any chain, one descriptor at a time, with every check and its error."""
        slice_memory = self.memory.slice
        ram_end, ram, ram_readonly = self._ram_end, self._ram, self._ram_readonly
        size = self.size
        table = self._descriptors
        entries = size
        index = head
        in_indirect = False
        budget = size  # buffers a chain may have; also what stops a loop
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_length = writable_length = 0
        while True:
            if index >= entries:
                raise GuestError(f"chain {head}: next descriptor {index} is beyond the "
                                 f"{'indirect table' if in_indirect else 'queue'} size {entries}", head)
            address, length, flags, next_index = _unpack_descriptor(table, index << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # Must be the chain's last direct descriptor; its WRITE flag means nothing.
                if in_indirect:  # also what bounds the walk: table pointers cost no budget
                    raise GuestError(f"chain {head}: nested indirect table", head)
                if not self.indirect:
                    raise GuestError(f"chain {head}: indirect descriptor, but INDIRECT_DESC "
                                     "was not negotiated", head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise GuestError(f"chain {head}: descriptor {index} has both INDIRECT and NEXT", head)
                if length == 0 or length & 15 or length > size << 4:
                    raise GuestError(f"chain {head}: indirect table of {length} bytes is not "
                                     f"1 to {size} descriptors", head)
                end = address + length
                if end > ADDRESS_LIMIT:
                    raise GuestError(f"chain {head}: indirect table overflows the address space", head)
                entries = length >> 4
                table = ram_readonly[address:end] if end <= ram_end else slice_memory(address, length)
                in_indirect = True
                index = 0
                continue
            if budget == 0:
                raise GuestError(f"chain {head}: longer than the queue size {size} (a loop?)", head)
            budget -= 1
            end = address + length
            if end > ADDRESS_LIMIT:
                raise GuestError(f"chain {head}: buffer {address:#x}+{length:#x} overflows", head)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(ram[address:end] if end <= ram_end else slice_memory(address, length))
                writable_length += length
            else:
                view = (ram_readonly[address:end] if end <= ram_end
                        else slice_memory(address, length).toreadonly())
                if writable:
                    raise GuestError(f"chain {head}: readable buffer after a writable one", head)
                readable.append(view)
                readable_length += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = next_index
        if readable_length + writable_length > MAX_CHAIN_BYTES:
            raise GuestError(f"chain {head}: more than 4 GiB of buffers", head)
        return Chain(head, readable, writable, readable_length, writable_length)

    def add_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver, `written` bytes having been written into it."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor of a queue of {self.size}")
        self._publish_used(head, written)

    def _publish_used(self, head: int, written: int) -> None:
        # The element is stored before the idx that publishes it: a driver that sees the
        # new idx must find the element already there.
        elements, slot = self._used_elements, (self._next_used & self._mask) << 1
        elements[slot] = head
        elements[slot + 1] = written
        self._next_used = next_used = (self._next_used + 1) & 0xFFFF
        self._used_idx[0] = next_used

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last call.

        False when nothing was added. With EVENT_IDX: whether the driver's used_event lies
        among the entries added since (wrap-around safe). Without: unless the driver set
        VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        full_barrier()  # our used idx store must be visible before we read the driver's wish
        if self.event_idx:
            used_event = _unpack_u16(self._avail, self._used_event_offset)[0]
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not _unpack_u16(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notifications(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it makes buffers available.

        Without EVENT_IDX this is the used ring's VIRTQ_USED_F_NO_NOTIFY flag; with it,
        enabling sets avail_event to our position, so the next buffer kicks (disabling
        leaves avail_event behind: no kicks until the driver's idx wraps round to it).

        Race: buffers published while notifications were off came with no kick. After
        enabling, call `pop()`/`has_available()` again before waiting for a kick.
        """
        self._notifications = enabled
        self._publish_notification_state()
        if enabled:
            full_barrier()  # the setting must be visible before the caller's re-check reads idx

    def _publish_notification_state(self) -> None:
        if self.event_idx:
            if self._notifications:
                self._avail_event[0] = self._last_available
        else:
            self._used_flags[0] = 0 if self._notifications else VIRTQ_USED_F_NO_NOTIFY
