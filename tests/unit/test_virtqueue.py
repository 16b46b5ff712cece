"""The split virtqueue core against a fake driver: every rule the guest can break, the
ordering and notification rules the driver relies on, and property tests."""

import ctypes
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import (
    DESCRIPTOR,
    U16,
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
    VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_WRITE as WRITE,
    GuestError,
    QueueConfig,
    SplitQueue,
)
from sandvmm.memory import GiB, MiB, GuestMemory

RAM_SIZE = 4 * MiB
SMALL_RAM_SIZE = 256 * 1024  # for the garbage test, which snapshots RAM at every step
SCRATCH = 0x200000  # free RAM for hand-written buffers and tables, away from the driver's arena
EXTRA = 0x10000  # in the garbage test: more descriptors, where indirect tables can point


@pytest.fixture(scope="module")
def shared_memory():
    return GuestMemory(RAM_SIZE)


@pytest.fixture
def ram(shared_memory):
    shared_memory.view[:] = bytes(RAM_SIZE)
    return shared_memory


@pytest.fixture(scope="module")
def small_memory():
    return GuestMemory(SMALL_RAM_SIZE)


@pytest.fixture(scope="module")
def two_region_memory():
    """RAM below 3 GiB and 64 KiB above 4 GiB (sparse: only touched pages cost)."""
    return GuestMemory(3 * GiB + 64 * 1024)


def make(memory, size=8, *, event_idx=False, indirect=True, start=0):
    driver = FakeDriver(memory, size, event_idx=event_idx, start_index=start)
    queue = SplitQueue(memory, driver.config, event_idx=event_idx, indirect=indirect,
                       last_available=start, next_used=start)
    return driver, queue


_python = ctypes.PyDLL(None)  # our own handle: argtypes set here stay here
_python.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
_python.PyBuffer_Release.argtypes = [ctypes.c_void_p]


def host_address(view) -> int:
    """Where a buffer's bytes are: Py_buffer.buf, its first field."""
    py_buffer = (ctypes.c_char * 128)()  # larger than a Py_buffer
    _python.PyObject_GetBuffer(view, py_buffer, 0)
    try:
        return ctypes.c_void_p.from_buffer(py_buffer).value or 0
    finally:
        _python.PyBuffer_Release(py_buffer)


def guest_range(memory, view) -> tuple[int, int]:
    """The guest-physical (address, length) a view covers; fails if it is not in guest RAM."""
    offset = host_address(view) - host_address(memory.view)
    for region in memory.regions:
        if region.file_offset <= offset and offset + len(view) <= region.file_offset + region.size:
            return region.guest_address + offset - region.file_offset, len(view)
    raise AssertionError(f"view at mapping offset {offset:#x}+{len(view):#x} is outside guest RAM")


def ranges(memory, views):
    return [guest_range(memory, view) for view in views]


def check_completes(driver, queue, bad_head):
    """The device completes the bad chain and goes on serving good ones."""
    if bad_head is not None:
        queue.add_used(bad_head, 0)
    good = driver.add_chain(readable=[b"next"], writable=[4])
    chain = queue.pop()
    assert chain.head == good and chain.read() == b"next"
    queue.add_used(chain.head, chain.write(b"done"))
    expected = [(good, 4)] if bad_head is None else [(bad_head, 0), (good, 4)]
    assert driver.used() == expected
    assert driver.written_data(good) == b"done"


# ---- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, 1 << 20])
def test_size_must_be_a_power_of_two_up_to_32768(ram, size):
    with pytest.raises(GuestError, match="power of two"):
        SplitQueue(ram, QueueConfig(size, 0x1000, 0x2000, 0x3000), event_idx=False, indirect=False)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_valid_sizes_work(ram, size):
    driver, queue = make(ram, size)
    head = driver.add_chain(writable=[1])
    assert queue.pop().head == head


@pytest.mark.parametrize("field, misalignment", [
    ("descriptor_table", 8), ("driver_area", 1), ("device_area", 2)])
def test_areas_must_be_aligned(ram, field, misalignment):
    config = QueueConfig(16, 0x1000, 0x2000, 0x3000)
    setattr(config, field, getattr(config, field) + misalignment)
    with pytest.raises(GuestError, match="aligned"):
        SplitQueue(ram, config, event_idx=False, indirect=False)


@pytest.mark.parametrize("field, address", [
    ("descriptor_table", RAM_SIZE - 16 * 8),  # 16 entries need 256 bytes
    ("driver_area", RAM_SIZE - 2),
    ("device_area", RAM_SIZE),
    ("device_area", 2**64 - 4),  # would wrap around the address space
    ("descriptor_table", 2**64)])
def test_areas_must_be_inside_ram(ram, field, address):
    config = QueueConfig(16, 0x1000, 0x2000, 0x3000)
    setattr(config, field, address)
    with pytest.raises(GuestError):
        SplitQueue(ram, config, event_idx=False, indirect=False)


def test_area_across_the_mmio_hole_is_refused(two_region_memory):
    config = QueueConfig(16, 0x1000, 0x2000, 3 * GiB - 64)  # the used ring needs 134 bytes
    with pytest.raises(GuestError, match="device area"):
        SplitQueue(two_region_memory, config, event_idx=False, indirect=False)


# ---- chains ---------------------------------------------------------------------------

def test_chain_gives_zero_copy_views_of_the_offered_buffers(ram):
    driver, queue = make(ram)
    head = driver.add_chain(readable=[b"head", b"er"], writable=[3, 5])
    chain = queue.pop()
    offered = driver.chain(head)
    assert chain.head == head
    assert ranges(ram, chain.readable) == offered.readable
    assert ranges(ram, chain.writable) == offered.writable
    assert (chain.readable_length, chain.writable_length) == (6, 8)
    assert chain.read() == b"header" and chain.read(3) == b"hea" and chain.read(3, offset=3) == b"der"
    with pytest.raises(TypeError):
        chain.readable[0][0] = 0  # the driver's request is not ours to change
    assert queue.pop() is None


def test_write_scatters_and_stops_at_the_end_of_the_writable_buffers(ram):
    driver, queue = make(ram)
    head = driver.add_chain(writable=[3, 5])
    chain = queue.pop()
    end = driver.chain(head).writable[1][0] + 5
    ram.write(end, b"\xee" * 3)  # the driver's padding after the last buffer
    assert chain.write(b"ab", offset=2) == 2
    assert chain.write(b"0123456789", offset=4) == 4
    assert chain.write(b"x", offset=8) == 0
    queue.add_used(head, 8)
    assert driver.used() == [(head, 8)]
    assert driver.written_data(head) == b"\0\0ab0123"
    assert ram.read(end, 3) == b"\xee" * 3


def test_views_window_a_range_of_the_chain(ram):
    driver, queue = make(ram)
    driver.add_chain(readable=[b"abc", b"defg"], writable=[2, 2, 2])
    chain = queue.pop()
    assert [bytes(v) for v in chain.readable_views(2, 3)] == [b"c", b"de"]
    assert [bytes(v) for v in chain.readable_views(3)] == [b"defg"]
    assert [len(v) for v in chain.writable_views(0, 5)] == [2, 2, 1]
    assert chain.writable_views(6) == []
    with pytest.raises(ValueError):  # a device bug: negative offsets would index from the end
        chain.write(b"x", offset=-1)


def test_indirect_chain(ram):
    driver, queue = make(ram, 4)
    head = driver.add_chain(readable=[b"a", b"bc"], writable=[1, 2], indirect=True)
    chain = queue.pop()
    assert chain.read() == b"abc"
    assert ranges(ram, chain.writable) == driver.chain(head).writable
    queue.add_used(head, chain.write(b"xyz"))
    assert driver.used() == [(head, 3)] and driver.written_data(head) == b"xyz"


def test_direct_descriptors_then_an_indirect_table(ram):
    # The device must accept normal descriptors followed by one indirect descriptor.
    driver, queue = make(ram, 8)
    index = driver.reserve(2)
    table = SCRATCH
    driver.write_descriptor(index[0], SCRATCH + 0x100, 2, NEXT, index[1])
    driver.write_descriptor(index[1], table, 32, INDIRECT)
    driver.write_table(table, [(SCRATCH + 0x200, 3, NEXT, 1), (SCRATCH + 0x300, 4, WRITE, 0)])
    driver.offer(index[0])
    chain = queue.pop()
    assert ranges(ram, chain.readable) == [(SCRATCH + 0x100, 2), (SCRATCH + 0x200, 3)]
    assert ranges(ram, chain.writable) == [(SCRATCH + 0x300, 4)]


def test_zero_length_buffers_are_allowed(ram):
    driver, queue = make(ram)
    driver.add_chain(readable=[b""], writable=[0, 1])
    chain = queue.pop()
    assert [len(v) for v in chain.readable + chain.writable] == [0, 0, 1]
    assert chain.write(b"xy") == 1


def test_buffer_in_high_ram(two_region_memory):
    driver, queue = make(two_region_memory)
    index = driver.reserve(1)[0]
    driver.write_descriptor(index, 4 * GiB + 0x1000, 16, WRITE)
    driver.offer(index)
    chain = queue.pop()
    assert ranges(two_region_memory, chain.writable) == [(4 * GiB + 0x1000, 16)]


# Hand-written chains at descriptors 0.. (a fresh driver's first reserve()); each returns the
# head it offered, or None when it breaks the ring itself rather than one chain.
def _bad(driver, descriptors, head=0, table=None):
    indices = driver.reserve(max(len(descriptors), head + 1))
    assert indices == list(range(len(indices)))
    for index, descriptor in enumerate(descriptors):
        driver.write_descriptor(index, *descriptor)
    if table is not None:
        driver.write_table(SCRATCH, table)
    driver.offer(head)
    return head


BUFFER = SCRATCH + 0x1000
BAD_CHAINS = {
    "next index beyond the queue": lambda d: _bad(d, [(BUFFER, 4, NEXT, 8)]),
    "loop": lambda d: _bad(d, [(BUFFER, 4, NEXT, 1), (BUFFER, 4, NEXT, 0)]),
    "self loop": lambda d: _bad(d, [(BUFFER, 4, NEXT, 0)]),
    "buffer beyond RAM": lambda d: _bad(d, [(RAM_SIZE, 1, 0, 0)]),
    "buffer across the end of RAM": lambda d: _bad(d, [(RAM_SIZE - 4, 8, WRITE, 0)]),
    "address overflow": lambda d: _bad(d, [(2**64 - 8, 16, 0, 0)]),
    "readable after writable": lambda d: _bad(d, [(BUFFER, 4, WRITE | NEXT, 1), (BUFFER, 4, 0, 0)]),
    "indirect with next": lambda d: _bad(d, [(SCRATCH, 16, INDIRECT | NEXT, 1), (BUFFER, 4, 0, 0)],
                                         table=[(BUFFER, 4, 0, 0)]),
    "empty indirect table": lambda d: _bad(d, [(SCRATCH, 0, INDIRECT, 0)]),
    "indirect table not a multiple of 16": lambda d: _bad(d, [(SCRATCH, 24, INDIRECT, 0)],
                                                          table=[(BUFFER, 4, 0, 0)] * 2),
    "indirect table larger than the queue": lambda d: _bad(d, [(SCRATCH, 16 * 9, INDIRECT, 0)],
                                                           table=[(BUFFER, 1, 0, 0)] * 9),
    "indirect table beyond RAM": lambda d: _bad(d, [(RAM_SIZE - 16, 32, INDIRECT, 0)]),
    "indirect table overflow": lambda d: _bad(d, [(2**64 - 16, 32, INDIRECT, 0)]),
    "nested indirect": lambda d: _bad(d, [(SCRATCH, 16, INDIRECT, 0)], table=[(SCRATCH, 16, INDIRECT, 0)]),
    "indirect next beyond the table": lambda d: _bad(d, [(SCRATCH, 32, INDIRECT, 0)],
                                                     table=[(BUFFER, 1, NEXT, 2), (BUFFER, 1, 0, 0)]),
    "loop in the indirect table": lambda d: _bad(d, [(SCRATCH, 32, INDIRECT, 0)],
                                                 table=[(BUFFER, 1, NEXT, 1), (BUFFER, 1, NEXT, 0)]),
    "writable then readable in the indirect table": lambda d: _bad(
        d, [(SCRATCH, 32, INDIRECT, 0)], table=[(BUFFER, 1, WRITE | NEXT, 1), (BUFFER, 1, 0, 0)]),
    "writable, then readable behind an indirect": lambda d: _bad(
        d, [(BUFFER, 1, WRITE | NEXT, 1), (SCRATCH, 16, INDIRECT, 0)], table=[(BUFFER, 1, 0, 0)]),
    "longer than the queue through an indirect table": lambda d: _bad(
        d, [(BUFFER, 1, NEXT, 1), (SCRATCH, 16 * 8, INDIRECT, 0)],
        table=[(BUFFER, 1, NEXT, i + 1) for i in range(7)] + [(BUFFER, 1, 0, 0)]),
    "a later head is the bad one": lambda d: _bad(d, [(BUFFER, 1, 0, 0), (BUFFER, 1, NEXT, 9)], head=1),
    "head index beyond the queue": lambda d: d.offer(8) or None,
}


@pytest.mark.parametrize("build", BAD_CHAINS.values(), ids=BAD_CHAINS.keys())
def test_bad_chain_is_a_guest_error_and_the_queue_goes_on(ram, build):
    driver, queue = make(ram, 8)
    expected_head = build(driver)
    with pytest.raises(GuestError) as error:
        queue.pop()
    assert error.value.head == expected_head
    assert queue.last_available == 1  # consumed
    check_completes(driver, queue, expected_head)


def test_indirect_needs_the_feature(ram):
    driver, queue = make(ram, 8, indirect=False)
    head = driver.add_chain(readable=[b"x"], indirect=True)
    with pytest.raises(GuestError, match="INDIRECT_DESC") as error:
        queue.pop()
    assert error.value.head == head
    check_completes(driver, queue, head)


def test_longest_chains_are_accepted(ram):
    driver, queue = make(ram, 8)
    for indirect in (False, True):  # 8 buffers in the ring, then 8 in an indirect table
        head = driver.add_chain(readable=[b"r"] * 4, writable=[1] * 4, indirect=indirect)
        chain = queue.pop()
        assert (len(chain.readable), len(chain.writable)) == (4, 4)
        queue.add_used(chain.head, 0)
        assert driver.used() == [(head, 0)]


def test_chain_of_more_than_4_gib_is_refused(ram):
    # 1025 overlapping 4 MiB buffers: every one is in RAM, the total does not fit used.len.
    driver, queue = make(ram, 2048)
    table = [(0, RAM_SIZE, NEXT, i + 1) for i in range(1024)] + [(0, RAM_SIZE, 0, 0)]
    _bad(driver, [(SCRATCH, 16 * len(table), INDIRECT, 0)], table=table)
    with pytest.raises(GuestError, match="4 GiB") as error:
        queue.pop()
    assert error.value.head == 0


class LenientMemory:
    """A memory that only looks at the low address bits: the queue must not rely on it."""

    def __init__(self, memory):
        self.slice = lambda address, length: memory.slice(address % RAM_SIZE, length)


@pytest.mark.parametrize("flags", [0, INDIRECT])
def test_address_overflow_is_caught_by_the_queue_itself(ram, flags):
    driver = FakeDriver(ram, 8)
    queue = SplitQueue(LenientMemory(ram), driver.config, event_idx=False, indirect=True)
    _bad(driver, [(2**64 - 16, 32, flags, 0)])
    with pytest.raises(GuestError, match="overflow") as error:
        queue.pop()
    assert error.value.head == 0


@pytest.mark.parametrize("start", [0, 65530])
def test_available_idx_too_far_ahead_breaks_the_ring(ram, start):
    driver, queue = make(ram, 8, start=start)
    driver.set_available_idx(start + 9)
    with pytest.raises(GuestError) as error:
        queue.has_available()
    assert error.value.head is None
    with pytest.raises(GuestError):
        queue.pop()
    driver.set_available_idx(start + 8)  # a full ring is fine
    assert queue.has_available()


def test_add_used_returns_the_chain(ram):
    # The order of its stores, as a driver on another CPU sees them: test_virtqueue_across_cpus.py.
    driver, queue = make(ram)
    head = driver.add_chain(writable=[4])
    chain = queue.pop()
    queue.add_used(chain.head, 3)
    assert driver.used() == [(head, 3)]
    with pytest.raises(ValueError):  # a device bug, not the guest's
        queue.add_used(8, 0)


def test_indexes_wrap_around(ram):
    driver, queue = make(ram, 4, start=65534)
    for _ in range(3):
        head = driver.add_chain(writable=[1])
        queue.add_used(queue.pop().head, 1)
        assert driver.used() == [(head, 1)]
    assert queue.last_available == queue.next_used == 1


# ---- notification suppression ---------------------------------------------------------

def complete(driver, queue, count):
    for _ in range(count):
        driver.add_chain(writable=[1])
        queue.add_used(queue.pop().head, 0)
    assert len(driver.used()) == count


def test_interrupts_without_event_idx(ram):
    driver, queue = make(ram)
    assert not queue.needs_interrupt()  # nothing used yet
    complete(driver, queue, 2)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()  # nothing new since
    driver.suppress_interrupts()
    complete(driver, queue, 1)
    assert not queue.needs_interrupt()
    driver.suppress_interrupts(False)
    complete(driver, queue, 1)
    assert queue.needs_interrupt()


@pytest.mark.parametrize("start", [0, 65533])
def test_interrupts_with_event_idx(ram, start):
    driver, queue = make(ram, event_idx=True, start=start)
    driver.suppress_interrupts()  # ignored with EVENT_IDX
    driver.set_used_event(start + 2)  # "interrupt me once entry start+2 is used"
    complete(driver, queue, 2)  # used idx start+2: entries start, start+1
    assert not queue.needs_interrupt()
    complete(driver, queue, 2)  # entries start+2, start+3: passes the event
    assert queue.needs_interrupt()
    driver.set_used_event(start + 3)  # just behind the entries added next
    complete(driver, queue, 1)
    assert not queue.needs_interrupt()
    driver.set_used_event(start + 5)
    complete(driver, queue, 1)
    assert queue.needs_interrupt()


def test_notifications_without_event_idx(ram):
    driver, queue = make(ram)
    assert not driver.notifications_suppressed
    queue.set_notifications(False)
    assert driver.notifications_suppressed
    driver.add_chain(writable=[1], publish=False)
    assert not driver.publish()
    queue.set_notifications(True)
    assert queue.has_available()  # the re-check that catches the kick-less buffer
    assert queue.pop() is not None and queue.pop() is None
    driver.add_chain(writable=[1], publish=False)
    assert driver.publish()


@pytest.mark.parametrize("start", [0, 65535])
def test_notifications_with_event_idx(ram, start):
    driver, queue = make(ram, event_idx=True, start=start)
    assert driver.avail_event == start
    driver.add_chain(writable=[1], publish=False)
    assert driver.publish()  # first buffer kicks
    queue.set_notifications(False)
    driver.add_chain(writable=[1], publish=False)
    assert not driver.publish()  # avail_event stays behind: no kick while draining
    queue.set_notifications(True)
    assert driver.avail_event == queue.last_available == start
    assert queue.pop() and queue.pop() and queue.pop() is None
    # The empty pop asked for a kick on the next buffer.
    assert driver.avail_event == (start + 2) & 0xFFFF
    driver.add_chain(writable=[1], publish=False)
    assert driver.publish()


# ---- property tests -------------------------------------------------------------------

start_indexes = st.one_of(st.integers(65500, 65535), st.integers(0, 65535))
valid_chains = st.tuples(st.lists(st.binary(max_size=24), max_size=4),
                         st.lists(st.integers(0, 24), max_size=4), st.booleans()
                         ).filter(lambda chain: chain[0] or chain[1])
DRAIN = "drain"


def drain_and_check(memory, driver, queue, offered, reverse):
    """Pop everything; each chain must be exactly what was offered, in order."""
    popped = []
    while (chain := queue.pop()) is not None:
        popped.append(chain)
    assert [chain.head for chain in popped] == [head for head, _ in offered]
    for chain, (head, (readable, writable, _)) in zip(popped, offered):
        expected = driver.chain(head)
        assert ranges(memory, chain.readable) == expected.readable
        assert ranges(memory, chain.writable) == expected.writable
        assert chain.read() == b"".join(readable)
        assert chain.write(bytes([head]) * 100) == sum(writable)
    completion = popped[::-1] if reverse else popped  # devices may complete out of order
    for chain in completion:
        queue.add_used(chain.head, chain.writable_length)
    assert driver.used() == [(chain.head, chain.writable_length) for chain in completion]
    for chain in popped:
        assert driver.written_data(chain.head) == bytes([chain.head]) * chain.writable_length


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([8, 16]), start=start_indexes, event_idx=st.booleans(),
       operations=st.lists(st.one_of(valid_chains, st.just(DRAIN)), min_size=1, max_size=80),
       reverse=st.booleans())
def test_valid_chains_come_out_exactly_as_offered(shared_memory, size, start, event_idx, operations,
                                                  reverse):
    shared_memory.view[:2 * MiB] = bytes(2 * MiB)
    driver, queue = make(shared_memory, size, event_idx=event_idx, start=start)
    offered = []
    for operation in operations + [DRAIN]:
        needed = 0 if operation == DRAIN else 1 if operation[2] else len(operation[0]) + len(operation[1])
        if operation == DRAIN or needed > driver.free_descriptors:
            driver.publish()
            drain_and_check(shared_memory, driver, queue, offered, reverse)
            offered = []
        if operation != DRAIN:
            readable, writable, indirect = operation
            offered.append((driver.add_chain(readable, writable, indirect=indirect, publish=False),
                            operation))
    chains = sum(operation != DRAIN for operation in operations)
    assert queue.last_available == queue.next_used == (start + chains) & 0xFFFF


class Bad(Exception):
    """The reference says: this chain breaks a rule."""


def reference_chain(ram: bytes, descriptor_table: int, size: int, head: int, indirect: bool):
    """An independent reading of the rules: [(address, length, writable)] or Bad."""
    buffers = []

    def in_ram(address, length):
        return address + length <= len(ram)

    def follow(table, entries, index, nested):
        while True:
            if index >= entries:
                raise Bad
            address, length, flags, next_index = DESCRIPTOR.unpack_from(ram, table + 16 * index)
            if flags & INDIRECT:
                if (nested or not indirect or flags & NEXT or not in_ram(address, length)
                        or length == 0 or length % 16 or length // 16 > size):
                    raise Bad
                return follow(address, length // 16, 0, True)
            writable = bool(flags & WRITE)
            if not in_ram(address, length) or (buffers and buffers[-1][2] and not writable):
                raise Bad
            buffers.append((address, length, writable))
            if len(buffers) > size:  # also what ends loops
                raise Bad
            if not flags & NEXT:
                return
            index = next_index

    follow(descriptor_table, size, head, False)
    return buffers


def tame(selector: int, raw: bytes, size: int) -> bytes:
    """Raw descriptor bytes one time in eight, else fields bent towards what can pass (drawing
    bytes and bending them is much faster than composing integer strategies)."""
    if selector & 7 == 0:
        return raw
    address, length, flags, next_index = DESCRIPTOR.unpack(raw)
    small, table, end = address % 0x20000, EXTRA + 16 * (address % 16), SMALL_RAM_SIZE - 64 + address % 128
    address = (small, small, small, small, table, table, end, address)[selector >> 3 & 7]
    length = length % 65 if selector & 64 else 16 * (length % 9)
    if selector & 0xC0 != 0xC0:
        flags, next_index = flags & 7, next_index % (size + 1)
    return DESCRIPTOR.pack(address, length, flags, next_index)


@st.composite
def garbage_queues(draw):
    size = draw(st.sampled_from([1, 2, 4, 8]))
    # Indirect tables have to be somewhere: more descriptors at EXTRA, where addresses point.
    count = size + draw(st.integers(0, 16))
    raw = draw(st.binary(min_size=17 * count, max_size=17 * count))
    descriptors = [tame(raw[i], raw[i + 1:i + 17], size) for i in range(0, 17 * count, 17)]
    flags, idx, used_event, *ring = struct.unpack(f"<3H{size}H", draw(st.binary(min_size=6 + 2 * size,
                                                                                 max_size=6 + 2 * size)))
    selector = draw(st.integers(0, 63))
    if selector & 7:  # mostly a sane count of new entries and heads inside the queue
        idx = 1 + idx % size
        ring = [head % size if selector & 0x38 else head for head in ring]
    avail = struct.pack(f"<{size + 3}H", flags & 3, idx, *ring, used_event)
    indirect, event_idx = draw(st.booleans()), draw(st.booleans())
    return size, b"".join(descriptors[:size]), b"".join(descriptors[size:]), avail, indirect, event_idx


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage_queues())
def test_garbage_rings_only_raise_guest_errors_and_stay_in_ram(small_memory, queue_bytes):
    size, table, extra, avail, indirect, event_idx = queue_bytes
    memory = small_memory
    memory.view[:] = bytes(SMALL_RAM_SIZE)
    config = QueueConfig(size, 0x1000, 0x2000, 0x3000)
    memory.write(0x1000, table)
    memory.write(0x2000, avail)
    memory.write(EXTRA, extra)
    queue = SplitQueue(memory, config, event_idx=event_idx, indirect=indirect)
    for _ in range(size + 2):
        snapshot = memory.read(0, SMALL_RAM_SIZE)
        available = U16.unpack_from(snapshot, 0x2002)[0]
        pending = (available - queue.last_available) & 0xFFFF
        head = U16.unpack_from(snapshot, 0x2004 + 2 * (queue.last_available % size))[0]
        try:
            chain = queue.pop()
        except GuestError as error:
            if error.head is None:
                assert pending > size or head >= size
                return  # the device would now need a reset
            assert error.head == head and pending and head < size
            with pytest.raises(Bad):
                reference_chain(snapshot, 0x1000, size, head, indirect)
            queue.add_used(error.head, 0)
            continue
        if chain is None:
            assert pending == 0
            return
        expected = reference_chain(snapshot, 0x1000, size, head, indirect)
        assert chain.head == head
        assert ranges(memory, chain.readable) == [(a, n) for a, n, w in expected if not w]
        assert ranges(memory, chain.writable) == [(a, n) for a, n, w in expected if w]
        # Scribbling over whatever the guest pointed us at (maybe the rings) is its business.
        queue.add_used(chain.head, chain.write(b"\xa5" * chain.writable_length))
