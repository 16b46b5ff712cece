"""Properties of the virtio-blk core: valid requests against a bytearray model, and garbage
chains that must never make it write outside the buffers the guest offered."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandvmm.devices.virtio.queue import GuestError, device_area_size
from sandvmm.memory import GuestMemory, MiB
from tests.unit.block_rig import (
    DISK_SECTORS, HEADER, S_OK, SMALL_RAM, T_DISCARD, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_IN, T_OUT,
    T_WRITE_ZEROES, Rig, header_only, segments,
)


@pytest.fixture(scope="module")
def memory():
    return GuestMemory(16 * MiB)  # queues keep views of it alive, so it is never closed


@pytest.fixture(scope="module")
def small_memory():
    return GuestMemory(SMALL_RAM)  # small enough to compare whole after every garbage example


def split(data_length: int, cuts: list[int]) -> list[int]:
    """Buffer sizes adding up to data_length, cut where `cuts` say (zero-length buffers allowed)."""
    points = sorted(cut % (data_length + 1) for cut in cuts)
    return [b - a for a, b in zip([0] + points, points + [data_length])]


layouts = st.fixed_dictionaries({"cuts": st.lists(st.integers(0, 1 << 16), max_size=5),
                                 "indirect": st.booleans(), "merge": st.booleans()})
operations = st.one_of(
    st.tuples(st.just("read"), st.integers(0, DISK_SECTORS - 1), st.integers(0, 8), layouts),
    st.tuples(st.just("write"), st.integers(0, DISK_SECTORS - 1), st.integers(0, 8), layouts),
    st.tuples(st.just("flush")),
    st.tuples(st.sampled_from(["discard", "write_zeroes"]),
              st.lists(st.tuples(st.integers(0, DISK_SECTORS - 1), st.integers(0, 6), st.booleans()),
                       min_size=1, max_size=4)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(operations, min_size=1, max_size=5), min_size=1, max_size=6))
def test_valid_requests_match_a_bytearray_model(memory, batches):
    rig = Rig(memory)
    model = bytearray(rig.disk.data)
    for batch in batches:
        expected = []  # per chain: (head, used length, status, data the guest should read)
        for operation in batch:
            kind = operation[0]
            if kind in ("read", "write"):
                _, sector, count, layout = operation
                count = min(count, DISK_SECTORS - sector)
                start, length = sector * 512, count * 512
                sizes = split(length, layout["cuts"])
                if kind == "read":
                    if layout["merge"]:
                        sizes[-1] += 1  # the status byte shares the last data buffer
                    else:
                        sizes.append(1)
                    head = rig.driver.add_chain(readable=header_only(T_IN, sector), writable=sizes,
                                                indirect=layout["indirect"])
                    expected.append((head, length + 1, bytes(model[start:start + length])))
                else:
                    payload = os.urandom(length)
                    pieces, offset = [], 0
                    for size in sizes:
                        pieces.append(payload[offset:offset + size])
                        offset += size
                    header = HEADER.pack(T_OUT, sector)
                    readable = [header + pieces[0]] + pieces[1:] if layout["merge"] else [header] + pieces
                    head = rig.driver.add_chain(readable=readable, writable=[1], indirect=layout["indirect"])
                    model[start:start + length] = payload
                    expected.append((head, 1, b""))
            elif kind == "flush":
                expected.append((rig.submit(T_FLUSH), 1, b""))
            else:
                entries = [(sector, min(count, DISK_SECTORS - sector), int(unmap and kind == "write_zeroes"))
                           for sector, count, unmap in operation[1]]
                request_type = T_DISCARD if kind == "discard" else T_WRITE_ZEROES
                expected.append((rig.submit(request_type, 0, segments(*entries)), 1, b""))
                for sector, count, _ in entries:
                    model[sector * 512:(sector + count) * 512] = bytes(count * 512)
        assert rig.core.process(0) == [0]
        assert rig.driver.used() == [(head, length) for head, length, _ in expected]
        for head, length, data in expected:
            written = rig.driver.written_data(head)
            assert written[-1] == S_OK and written[:length - 1] == data
        assert rig.disk.data == model


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


GARBAGE_TYPES = st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID,
                                 T_DISCARD, T_WRITE_ZEROES, T_GET_LIFETIME]) \
    | st.integers(0, 2**32 - 1)
GARBAGE_SECTORS = st.integers(0, DISK_SECTORS + 2) | st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descriptors=st.lists(st.tuples(st.integers(0, 0x3000), st.integers(0, 0x1200) | st.integers(0, 2**32 - 1),
                                      st.integers(0, 7), st.integers(0, 9)), min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 9), max_size=8), published=st.integers(0, 10),
       headers=st.lists(st.tuples(GARBAGE_TYPES, GARBAGE_SECTORS), min_size=8, max_size=8),
       fill=st.binary(min_size=0, max_size=0x3000))
def test_garbage_chains_never_raise_but_ring_errors_nor_write_outside_offered_buffers(
        small_memory, descriptors, heads, published, headers, fill):
    memory = small_memory
    rig = Rig(memory, size=8, data_size=0x8000)
    driver = rig.driver
    data = driver.data_address
    memory.slice(data, 0x4400)[:] = fill.ljust(0x4400, b"\0")
    for index, (sector_type, sector) in enumerate(headers):  # plausible headers at the buffers' usual spots
        memory.slice(data + index * 0x600, 16)[:] = HEADER.pack(sector_type, sector)
    for index, (offset, length, flags, next_index) in enumerate(descriptors):
        driver.write_descriptor(index, data + offset, length, flags, next_index)
    for head in heads:
        driver.offer(head, publish=False)
    driver.set_available_idx(published)
    before = bytes(memory.view)

    writable_ranges = []
    base = address_of(memory.view)

    def record(views):
        writable_ranges.extend((address_of(view) - base, len(view)) for view in views if len(view))

    complete, complete_three = rig.core._complete, rig.core._complete_three  # the queue's two ways in

    def recording_complete(chain):
        record(chain.writable)
        return complete(chain)

    def recording_complete_three(header, data, data_is_writable, status):
        record([data, status] if data_is_writable else [status])
        return complete_three(header, data, data_is_writable, status)
    rig.core._complete, rig.core._complete_three = recording_complete, recording_complete_three
    try:
        rig.core.process(0)
    except GuestError as error:
        assert error.head is None
    after = bytes(memory.view)  # all of guest RAM: a buffer anywhere in it is covered
    expected = bytearray(before)  # unchanged except where the device may write
    used_ring = driver.config.device_area
    for start, length in writable_ranges + [(used_ring, device_area_size(8))]:
        expected[start:start + length] = after[start:start + length]
    if expected != after:
        changed = next(i for i in range(len(after)) if expected[i] != after[i])
        raise AssertionError(f"the device wrote outside the offered buffers, at {changed:#x}")
