"""A fake virtio driver: the guest's side of one split virtqueue, for tests, fuzzers and benchmarks.

It lays out a descriptor table, available ring and used ring in guest memory (anything with
`slice(address, length) -> memoryview`, normally `sandvmm.memory.GuestMemory`), offers
chains the way a well-behaved driver does, and reads back what the device returned:

    memory = GuestMemory(1 << 20)
    driver = FakeDriver(memory, size=16)
    queue = SplitQueue(memory, driver.config, event_idx=False, indirect=True)
    head = driver.add_chain(readable=[b"request"], writable=[64])
    chain = queue.pop()                  # device side
    queue.add_used(chain.head, chain.write(b"reply"))
    assert driver.used() == [(head, 5)]
    assert driver.written_data(head, 5) == b"reply"

Buffers come from a data arena after the rings, handed out in order and wrapping around;
a chain's buffers (and its indirect table) are one contiguous extent that is not reused
while the chain is in flight. Ring descriptors come from a free list, so after a few
completions chains use scattered, non-consecutive indices, as real drivers' do.

For negative tests, `reserve()` takes descriptor indices out of the driver's bookkeeping,
and `write_descriptor()`, `write_table()`, `offer()` and `set_available_idx()` write
whatever you like. A malformed chain the device completed is accepted back by `used()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sandvmm.devices.virtio.queue import (
    DESCRIPTOR,
    U16,
    USED_ELEMENT,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueConfig,
    descriptor_table_size,
    device_area_size,
    driver_area_size,
)

BUFFER_ALIGNMENT = 8


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's wrap-around-safe "did [old, new) pass event?" (both sides use it)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class DriverError(Exception):
    """The fake driver cannot do what was asked, or the device broke the protocol."""


@dataclass
class OfferedChain:
    head: int
    readable: list[tuple[int, int]]  # (guest address, length), in chain order
    writable: list[tuple[int, int]]
    descriptors: list[int]  # ring descriptor indices the chain holds
    extent: tuple[int, int]  # [start, end) of its buffers and indirect table in the arena


class FakeDriver:
    """The guest side of one split virtqueue of `size` entries, laid out from `address`.

    `start_index` starts the avail and used indexes somewhere other than 0 (pass the same
    value to SplitQueue as last_available/next_used) so that tests reach the 16-bit wrap
    quickly. `event_idx` says whether VIRTIO_F_EVENT_IDX is negotiated (it changes how
    `publish()` decides whether to kick).
    """

    def __init__(self, memory, size: int = 256, *, address: int = 0x10000,
                 data_size: int = 1 << 20, start_index: int = 0, event_idx: bool = False):
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self._mask = size - 1
        descriptor_table = _align(address, 16)
        driver_area = descriptor_table + descriptor_table_size(size)
        device_area = _align(driver_area + driver_area_size(size), 4)
        self.config = QueueConfig(size, descriptor_table, driver_area, device_area)
        self.data_address = _align(device_area + device_area_size(size), 4096)
        self.data_end = self.data_address + data_size
        self._cursor = self.data_address
        self._descriptors = memory.slice(descriptor_table, descriptor_table_size(size))
        self._avail = memory.slice(driver_area, driver_area_size(size))
        self._used = memory.slice(device_area, device_area_size(size))
        for view in (self._descriptors, self._avail, self._used):
            view[:] = bytes(len(view))
        # The driver area as 16-bit fields (flags, idx, ring..., used_event): an item store
        # is one machine store, which a device on another thread must never see half done
        # (struct.pack_into zeroes a field before writing it).
        self._avail_fields = self._avail.cast("H")
        start_index &= 0xFFFF
        self._next_available = self._published = self._last_used = start_index
        self._avail_fields[1] = start_index
        self._used[2:4].cast("H")[0] = start_index
        self.set_used_event(start_index)  # a fresh driver wants to hear of the first completion
        self._free = deque(range(size))
        self._in_flight: dict[int, OfferedChain] = {}
        self._completed: dict[int, OfferedChain] = {}
        self._raw_offers: dict[int, int] = {}  # head -> times offered through offer()

    # ---- offering chains -------------------------------------------------------------

    def add_chain(self, readable=(), writable=(), *, indirect: bool = False,
                  publish: bool = True) -> int:
        """Offer a chain: `readable` buffers (bytes) then `writable` ones (sizes). Returns its head.

        With `indirect`, the buffers go in an indirect table behind one ring descriptor.
        With publish=False the chain is in the ring but the avail idx is not yet moved:
        `publish()` then offers everything added so far and says whether to kick.
        """
        readable = [bytes(data) for data in readable]
        writable = [int(length) for length in writable]
        count = len(readable) + len(writable)
        if not 1 <= count <= self.size:
            raise ValueError(f"a chain has 1 to {self.size} buffers, not {count}")
        ring_count = 1 if indirect else count
        if len(self._free) < ring_count:
            raise DriverError(f"{len(self._free)} free descriptors, {ring_count} needed: "
                              "collect used() entries first")
        lengths = [len(data) for data in readable] + writable
        table_length = descriptor_table_size(count) if indirect else 0
        start = self._allocate(table_length + sum(_align(n, BUFFER_ALIGNMENT) for n in lengths))
        addresses = []
        cursor = start + table_length
        for length in lengths:
            addresses.append(cursor)
            cursor += _align(length, BUFFER_ALIGNMENT)
        for address, data in zip(addresses, readable):
            self._put(address, data)
        for address, length in zip(addresses[len(readable):], writable):
            self._put(address, bytes(length))  # no stale data from an earlier chain
        indices = [self._free.popleft() for _ in range(ring_count)]
        links = list(range(1, count)) if indirect else indices[1:]
        entries = []
        for position, (address, length) in enumerate(zip(addresses, lengths)):
            flags = VIRTQ_DESC_F_WRITE if position >= len(readable) else 0
            last = position == count - 1
            entries.append((address, length, flags if last else flags | VIRTQ_DESC_F_NEXT,
                            0 if last else links[position]))
        if indirect:
            self.write_table(start, entries)
            self.write_descriptor(indices[0], start, table_length, VIRTQ_DESC_F_INDIRECT)
        else:
            for index, entry in zip(indices, entries):
                self.write_descriptor(index, *entry)
        head = indices[0]
        self._in_flight[head] = OfferedChain(
            head, list(zip(addresses, lengths[:len(readable)])),
            list(zip(addresses[len(readable):], writable)), indices, (start, cursor))
        self._push(head)
        if publish:
            self.publish()
        return head

    def publish(self) -> bool:
        """Move the avail idx over every chain added so far. Returns whether to kick the device.

        The kick decision is the driver's half of notification suppression: without
        EVENT_IDX, unless the device set VIRTQ_USED_F_NO_NOTIFY; with it, whether the new
        entries pass the device's avail_event.
        """
        old, new = self._published, self._next_available
        self._avail_fields[1] = new
        self._published = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self.avail_event, new, old)
        return not self.notifications_suppressed

    # ---- what the device returned ---------------------------------------------------

    def used(self) -> list[tuple[int, int]]:
        """(head, length written) of every used entry the device added since the last call.

        Their descriptors and buffers go back to the driver; `written_data(head)` still
        reads what the device wrote until the head is offered again.
        """
        used_idx = U16.unpack_from(self._used, 2)[0]
        count = (used_idx - self._last_used) & 0xFFFF
        if count > self.size:
            raise DriverError(f"used idx {used_idx} is {count} entries ahead of {self._last_used}")
        entries = []
        for _ in range(count):
            head, length = USED_ELEMENT.unpack_from(self._used, 4 + 8 * (self._last_used & self._mask))
            self._last_used = (self._last_used + 1) & 0xFFFF
            chain = self._in_flight.pop(head, None)
            if chain is not None:
                self._free.extend(chain.descriptors)
                self._completed[head] = chain
            elif self._raw_offers.get(head):
                self._raw_offers[head] -= 1
            else:
                raise DriverError(f"the device returned descriptor {head}, which is not in flight")
            entries.append((head, length))
        return entries

    def chain(self, head: int) -> OfferedChain:
        """Where an in-flight (or the last completed) chain with this head has its buffers."""
        chain = self._in_flight.get(head) or self._completed.get(head)
        if chain is None:
            raise KeyError(head)
        return chain

    def written_data(self, head: int, length: int | None = None) -> bytes:
        """The first `length` bytes (default: all) of the chain's writable buffers."""
        data = b"".join(bytes(self.memory.slice(address, size))
                        for address, size in self.chain(head).writable)
        return data if length is None else data[:length]

    @property
    def in_flight(self) -> int:
        """Chains offered and not yet returned (hand-written offers included)."""
        return len(self._in_flight) + sum(self._raw_offers.values())

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    # ---- notification suppression, driver side -----------------------------------------

    def suppress_interrupts(self, suppress: bool = True) -> None:
        """VIRTQ_AVAIL_F_NO_INTERRUPT (meaningful without EVENT_IDX)."""
        self._avail_fields[0] = VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0

    def set_used_event(self, value: int) -> None:
        """Interrupt me when the used idx passes `value` (with EVENT_IDX)."""
        self._avail_fields[2 + self.size] = value & 0xFFFF

    @property
    def avail_event(self) -> int:
        return U16.unpack_from(self._used, 4 + 8 * self.size)[0]

    @property
    def notifications_suppressed(self) -> bool:
        """Whether the device set VIRTQ_USED_F_NO_NOTIFY."""
        return bool(U16.unpack_from(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY)

    @property
    def available_idx(self) -> int:
        """The avail idx as published in guest memory."""
        return U16.unpack_from(self._avail, 2)[0]

    # ---- raw access, for negative tests -------------------------------------------------

    def reserve(self, count: int) -> list[int]:
        """Take `count` descriptor indices out of the free list, for hand-written chains."""
        if len(self._free) < count:
            raise DriverError(f"only {len(self._free)} free descriptors")
        return [self._free.popleft() for _ in range(count)]

    def allocate(self, length: int) -> int:
        """Scratch space in the data arena (not protected from reuse once the arena wraps)."""
        return self._allocate(_align(length, BUFFER_ALIGNMENT))

    def write_descriptor(self, index: int, address: int, length: int, flags: int = 0,
                         next_index: int = 0) -> None:
        """Any values, at ring descriptor `index` (fields are truncated to their widths)."""
        DESCRIPTOR.pack_into(self._descriptors, 16 * index, address & (2**64 - 1),
                             length & 0xFFFFFFFF, flags & 0xFFFF, next_index & 0xFFFF)

    def write_table(self, address: int, entries) -> None:
        """(address, length, flags, next) descriptors at a guest address: an indirect table."""
        table = bytearray(DESCRIPTOR.size * len(entries))
        for position, (buffer, length, flags, next_index) in enumerate(entries):
            DESCRIPTOR.pack_into(table, 16 * position, buffer, length, flags, next_index)
        self._put(address, table)

    def offer(self, head: int, publish: bool = True) -> None:
        """Put any head index in the next available ring slot."""
        self._raw_offers[head] = self._raw_offers.get(head, 0) + 1
        self._push(head)
        if publish:
            self.publish()

    def set_available_idx(self, value: int) -> None:
        """Write the avail idx directly (the driver's own count is left alone)."""
        self._avail_fields[1] = value & 0xFFFF

    # ---- internals ----------------------------------------------------------------------

    def _push(self, head: int) -> None:
        self._avail_fields[2 + (self._next_available & self._mask)] = head & 0xFFFF
        self._next_available = (self._next_available + 1) & 0xFFFF

    def _put(self, address: int, data) -> None:
        if data:
            self.memory.slice(address, len(data))[:] = data

    def _allocate(self, length: int) -> int:
        if length > self.data_end - self.data_address:
            raise DriverError(f"{length} bytes do not fit in the data arena")
        start = self._cursor
        if start + length > self.data_end:
            start = self.data_address
        end = start + length
        for chain in self._in_flight.values():
            if length and chain.extent[0] < end and start < chain.extent[1]:
                raise DriverError("the data arena is full of in-flight chains: collect used() first")
        self._cursor = end
        return start


__all__ = ["DriverError", "FakeDriver", "OfferedChain", "need_event"]
