"""The virtqueue's bulk paths for indirect tables (SplitQueue._ordinary_table, and the
three-entry tables `serve()` offers its `handle_three`).

A table of BULK_TABLE_BYTES or more behind a head descriptor is read in bulk when it is
ordinary, and so is a table of exactly three entries (a 4 KiB block request) when served;
anything else goes to the general walk, which must then decide exactly as it does for
other tables.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import (
    BULK_TABLE_BYTES,
    DESCRIPTOR,
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
    VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_WRITE as WRITE,
    GuestError,
    SplitQueue,
)
from sandvmm.memory import GiB
# The fixtures too (shared_memory, ram, two_region_memory: guest RAM of RAM_SIZE, and RAM above 4 GiB).
from tests.unit.test_virtqueue import RAM_SIZE, Bad, ram, ranges, reference_chain, shared_memory, two_region_memory  # noqa: F401

QUEUE_SIZE = 64
RINGS = 0x10000  # the fake driver's descriptor table, then its rings and buffers
TABLE = 0x200000  # where hand-written tables go
BUFFERS = 0x210000  # and their buffers, 0x100 apart
ENTRIES = 2 * BULK_TABLE_BYTES // DESCRIPTOR.size  # a table the bulk path takes on


class SliceOnly:
    """The same RAM without identity_views(): every chain takes the general walk."""

    def __init__(self, memory):
        self.slice = memory.slice


def ordinary_table(count=ENTRIES, writable_from=1):
    """Linux's layout: a header, then buffers (writable from `writable_from` on), entries linked in order."""
    return [(BUFFERS + 0x100 * i, 16 + i, (WRITE if i >= writable_from else 0) | (NEXT if i < count - 1 else 0),
             i + 1 if i < count - 1 else 0) for i in range(count)]


def offer_table(memory, entries, head_flags=INDIRECT, table_length=None, queue_memory=None, size=QUEUE_SIZE):
    """One head descriptor pointing at `entries` written at TABLE; returns the queue to pop."""
    driver = FakeDriver(memory, size, address=RINGS)
    queue = SplitQueue(queue_memory or memory, driver.config, event_idx=False, indirect=True)
    head = driver.reserve(1)[0]
    driver.write_table(TABLE, entries)
    length = DESCRIPTOR.size * len(entries) if table_length is None else table_length
    driver.write_descriptor(head, TABLE, length, head_flags)
    driver.offer(head)
    return queue


def bulk_results(queue, monkeypatch, path="_ordinary_table"):
    """What a bulk path returns, each time pop() offers it a table (a list that grows)."""
    results = []
    offer = getattr(queue, path)

    def record(*args):
        results.append(offer(*args))
        return results[-1]

    monkeypatch.setattr(queue, path, record)
    return results


def pop_outcome(queue, memory):
    """What a pop gives, comparable between paths: ranges and read-only flags, or the error."""
    try:
        chain = queue.pop()
    except GuestError as error:
        return ("error", error.head, str(error))
    return ("chain", chain.head, ranges(memory, chain.readable), ranges(memory, chain.writable),
            [view.readonly for view in chain.readable + chain.writable],
            chain.readable_length, chain.writable_length)


def serve_outcome(queue, memory):
    """What serve() makes of the one chain offered, in pop_outcome's terms (an error is
    completed, not raised: it has no message), and what handle_three was offered."""
    offered, chains = [], []

    def handle_three(*buffers):
        offered.append(buffers)
        return None  # so that the chain goes on to handle, as a Chain

    def handle(chain):
        chains.append(chain)
        return 0
    assert queue.serve(handle, handle_three=handle_three) == 1
    if not chains:
        return ("error",), offered
    chain, = chains
    return ("chain", chain.head, ranges(memory, chain.readable), ranges(memory, chain.writable),
            [view.readonly for view in chain.readable + chain.writable],
            chain.readable_length, chain.writable_length), offered


def general_walk_outcome(memory, *args, **kwargs):
    return pop_outcome(offer_table(memory, *args, queue_memory=SliceOnly(memory), **kwargs), memory)


def test_an_ordinary_table_is_read_in_bulk(ram, monkeypatch):
    entries = ordinary_table(writable_from=3)
    queue = offer_table(ram, entries)
    bulk = bulk_results(queue, monkeypatch)
    chain = queue.pop()
    assert bulk == [chain]
    assert ranges(ram, chain.readable) == [(address, length) for address, length, *_ in entries[:3]]
    assert ranges(ram, chain.writable) == [(address, length) for address, length, *_ in entries[3:]]
    assert all(view.readonly for view in chain.readable)
    assert not any(view.readonly for view in chain.writable)
    assert all(view.obj is ram.mapping for view in chain.readable + chain.writable)
    assert (chain.readable_length, chain.writable_length) == (16 * 3 + 3, sum(16 + i for i in range(3, ENTRIES)))
    with pytest.raises(TypeError):
        chain.readable[0][0] = 1


@pytest.mark.parametrize("writable_from", [0, ENTRIES], ids=["all writable", "all readable"])
def test_one_sided_tables_take_the_bulk_path(ram, monkeypatch, writable_from):
    queue = offer_table(ram, ordinary_table(writable_from=writable_from))
    bulk = bulk_results(queue, monkeypatch)
    chain = queue.pop()
    assert bulk == [chain]
    assert (len(chain.readable), len(chain.writable)) == (writable_from, ENTRIES - writable_from)


def test_unknown_flag_bits_are_ignored_in_bulk_too(ram):
    entries = [(address, length, flags | 0xFFF8, link) for address, length, flags, link in ordinary_table()]
    assert pop_outcome(offer_table(ram, entries), ram) == general_walk_outcome(ram, entries)
    assert pop_outcome(offer_table(ram, entries), ram)[0] == "chain"


def _set(entries, index, **fields):
    """A copy of the table with some fields of one entry changed."""
    address, length, flags, link = entries[index]
    changed = {**dict(address=address, length=length, flags=flags, link=link), **fields}
    return [*entries[:index], tuple(changed.values()), *entries[index + 1:]]


TABLE_END = ENTRIES - 1
MALFORMED = {  # name: (entries, what the general walk says)
    "nested indirect": (_set(ordinary_table(), 9, flags=INDIRECT | NEXT), "nested indirect"),
    "readable after writable": (_set(ordinary_table(), 9, flags=NEXT), "readable buffer after a writable"),
    "loop": (_set(ordinary_table(), 9, link=4), "longer than the queue"),
    "self loop": (_set(ordinary_table(), 9, link=9), "longer than the queue"),
    "next beyond the table": (_set(ordinary_table(), 9, link=ENTRIES + 3), "beyond the indirect table"),
    "NEXT on the last entry": (_set(ordinary_table(), TABLE_END, flags=WRITE | NEXT, link=ENTRIES),
                               "beyond the indirect table"),
    "last entry loops to the first": (_set(ordinary_table(writable_from=0), TABLE_END, flags=WRITE | NEXT, link=0),
                                      "longer than the queue"),
    "buffer beyond RAM": (_set(ordinary_table(), 9, address=RAM_SIZE), "not RAM"),
    "buffer across the end of RAM": (_set(ordinary_table(), 9, address=RAM_SIZE - 8, length=16), "not RAM"),
    "address overflow": (_set(ordinary_table(), 9, address=2**64 - 8, length=16), "overflows"),
}


@pytest.mark.parametrize("entries, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_long_tables_are_refused_as_the_general_walk_refuses_them(ram, monkeypatch, entries, message):
    queue = offer_table(ram, entries)
    bulk = bulk_results(queue, monkeypatch)
    outcome = pop_outcome(queue, ram)
    assert bulk == [None]  # declined: the walk went on and found the error
    assert outcome[0] == "error" and message in outcome[2]
    assert outcome == general_walk_outcome(ram, entries)


def test_a_long_table_of_more_than_4_gib_is_refused(ram, monkeypatch):
    # 1025 overlapping buffers of all RAM: each is fine, together they do not fit used.len.
    entries = [(0, RAM_SIZE, NEXT, i + 1) for i in range(1024)] + [(0, RAM_SIZE, 0, 0)]
    queue = offer_table(ram, entries, size=2048)
    bulk = bulk_results(queue, monkeypatch)
    outcome = pop_outcome(queue, ram)
    assert bulk == [None]
    assert outcome[0] == "error" and "4 GiB" in outcome[2]
    assert outcome == general_walk_outcome(ram, entries, size=2048)


MALFORMED_HEADS = {  # the head descriptor pointing at a long table is wrong
    "indirect with next": dict(head_flags=INDIRECT | NEXT),
    "table not a multiple of 16": dict(table_length=16 * ENTRIES + 8),
    "table larger than the queue": dict(table_length=16 * (QUEUE_SIZE + 1)),
}


@pytest.mark.parametrize("head", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
def test_malformed_heads_of_long_tables_are_refused(ram, monkeypatch, head):
    entries = ordinary_table(QUEUE_SIZE + 1)
    queue = offer_table(ram, entries, **head)
    bulk = bulk_results(queue, monkeypatch)
    outcome = pop_outcome(queue, ram)
    assert bulk == []  # refused before the table is read
    assert outcome[0] == "error"
    assert outcome == general_walk_outcome(ram, entries, **head)


UNUSUAL = {  # valid, but not for the bulk path: the general walk accepts them
    # 0 -> last -> ... -> 2 -> 1
    "links out of order": [(BUFFERS, 8, NEXT, ENTRIES - 1), (BUFFERS + 0x100, 8, 0, 0)]
    + [(BUFFERS + 0x100 * i, 8, NEXT, i - 1) for i in range(2, ENTRIES)],
    # every buffer is in RAM, but max(address) + max(length) is not
    "a large buffer and one at the end of RAM": _set(_set(ordinary_table(), 9, address=RAM_SIZE - 16, length=16),
                                                     10, length=64 * 1024),
}


@pytest.mark.parametrize("entries", UNUSUAL.values(), ids=UNUSUAL.keys())
def test_unusual_long_tables_are_accepted_by_the_general_walk(ram, monkeypatch, entries):
    queue = offer_table(ram, entries)
    bulk = bulk_results(queue, monkeypatch)
    outcome = pop_outcome(queue, ram)
    assert bulk == [None]
    assert outcome[0] == "chain"
    assert outcome == general_walk_outcome(ram, entries)


def test_a_long_table_with_a_buffer_in_high_ram(two_region_memory):
    entries = _set(ordinary_table(), 9, address=4 * GiB + 0x1000)
    chain = offer_table(two_region_memory, entries).pop()
    assert (4 * GiB + 0x1000, 25) in ranges(two_region_memory, chain.writable)
    assert len(chain.readable) + len(chain.writable) == ENTRIES


# ---- long tables, mostly ordinary, bent at random: bulk path = general walk = reference ----

FIELDS = ("address", "length", "flags", "link")
ADDRESSES = (BUFFERS, RAM_SIZE - 32, RAM_SIZE - 8, RAM_SIZE, 2**64 - 8, TABLE, 0)


@st.composite
def bent_tables(draw, counts=st.integers(ENTRIES // 2, QUEUE_SIZE)):
    count = draw(counts)
    entries = ordinary_table(count, writable_from=draw(st.integers(0, count)))
    for _ in range(draw(st.integers(0, 3))):
        index, field, value = draw(st.integers(0, count - 1)), draw(st.sampled_from(FIELDS)), draw(st.integers(0, 2**16))
        value = {"address": (ADDRESSES[value % len(ADDRESSES)] + (value >> 3) % 64) % 2**64,
                 "length": (0, 8, 64 * 1024, 2**32 - 1)[value % 4],
                 "flags": value & 0xFFFF,
                 "link": value % (count + 2)}[field]
        entries = _set(entries, index, **{field: value})
    return entries


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=bent_tables())
def test_bent_long_tables_come_out_as_the_general_walk_and_the_reference_say(shared_memory, entries):
    check_against_general_walk_and_reference(shared_memory, entries)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=bent_tables(st.just(3)))
def test_bent_three_entry_tables_come_out_as_the_general_walk_and_the_reference_say(shared_memory, entries):
    check_against_general_walk_and_reference(shared_memory, entries, served=True)


def check_against_general_walk_and_reference(memory, entries, served=False):
    memory.view[:] = bytes(RAM_SIZE)
    queue = offer_table(memory, entries)
    snapshot = memory.read(0, RAM_SIZE)
    walked = general_walk_outcome(memory, entries)
    if served:
        outcome, _ = serve_outcome(queue, memory)
        assert outcome == (walked[:1] if walked[0] == "error" else walked)
        outcome = walked  # the same, with the head and the message
    else:
        outcome = pop_outcome(queue, memory)
        assert outcome == walked
    try:
        expected = reference_chain(snapshot, RINGS, QUEUE_SIZE, outcome[1], True)
    except Bad:
        assert outcome[0] == "error"
        return
    if sum(length for _, length, _ in expected) > MAX_CHAIN_BYTES:
        assert outcome[0] == "error" and "4 GiB" in outcome[2]
        return
    assert outcome[0] == "chain"
    assert outcome[2] == [(address, length) for address, length, writable in expected if not writable]
    assert outcome[3] == [(address, length) for address, length, writable in expected if writable]


# ---- three-entry tables: header, data, status -----------------------------------------------

@pytest.mark.parametrize("writable_from, readable_length, writable_length", [(1, 16, 17 + 18), (2, 16 + 17, 18)],
                         ids=["a read", "a write"])
def test_three_entry_tables_are_read_whole(ram, writable_from, readable_length, writable_length):
    entries = ordinary_table(3, writable_from=writable_from)
    queue = offer_table(ram, entries)
    outcome, offered = serve_outcome(queue, ram)
    (header, data, data_is_writable, status), = offered
    assert ranges(ram, [header, data, status]) == [(address, length) for address, length, *_ in entries]
    assert (header.readonly, data.readonly, data_is_writable, status.readonly) == (
        True, writable_from == 2, writable_from == 1, False)
    assert outcome == general_walk_outcome(ram, entries)  # the Chain made of them when handle_three declines
    assert outcome[5:] == (readable_length, writable_length)


UNUSUAL_THREE = {  # valid, but not what the three-entry path takes
    "all readable": ordinary_table(3, writable_from=3),
    "all writable": ordinary_table(3, writable_from=0),
    "links out of order": [(BUFFERS, 8, NEXT, 2), (BUFFERS + 0x100, 8, WRITE, 0), (BUFFERS + 0x200, 8, WRITE | NEXT, 1)],
}


@pytest.mark.parametrize("entries", UNUSUAL_THREE.values(), ids=UNUSUAL_THREE.keys())
def test_unusual_three_entry_tables_are_walked(ram, entries):
    outcome, offered = serve_outcome(offer_table(ram, entries), ram)
    assert offered == [] and outcome[0] == "chain"
    assert outcome == general_walk_outcome(ram, entries)


@pytest.mark.parametrize("field, value, message", [
    ("address", RAM_SIZE - 8, "not RAM"),
    ("address", 2**64 - 8, "overflows"),
    ("flags", INDIRECT | NEXT | WRITE, "nested indirect"),
    ("link", 0, "readable buffer after a writable"),
    ("link", 1, "longer than the queue"),
    ("link", 3, "beyond the indirect table"),
])
def test_malformed_three_entry_tables_are_refused_as_the_general_walk_refuses_them(ram, field, value, message):
    entries = _set(ordinary_table(3), 1, **{field: value})
    outcome, offered = serve_outcome(offer_table(ram, entries), ram)
    assert offered == [] and outcome == ("error",)
    walked = general_walk_outcome(ram, entries)
    assert walked[0] == "error" and message in walked[2]
