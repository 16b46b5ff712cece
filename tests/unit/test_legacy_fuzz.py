"""Property tests: no sequence of guest accesses makes a legacy device raise or misbehave."""

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from sandvmm.main.legacy import I8042, PowerManagement, Rtc, Serial

offsets = st.integers(min_value=-4, max_value=24)
sizes = st.integers(min_value=0, max_value=8)
reads = st.tuples(st.just("read"), offsets, sizes)
writes = st.tuples(st.just("write"), offsets, st.binary(max_size=8))


def near(base_offsets):
    """Offsets biased towards the device's registers, so interesting states get reached."""
    return st.one_of(st.sampled_from(base_offsets), offsets)


def accesses(register_offsets, extra=()):
    targeted = st.one_of(st.tuples(st.just("read"), near(register_offsets), sizes),
                         st.tuples(st.just("write"), near(register_offsets), st.binary(max_size=8)))
    return st.lists(st.one_of(reads, writes, targeted, *extra), max_size=200)


def run(device, operations, check_read=None):
    for operation in operations:
        kind = operation[0]
        if kind == "read":
            _, offset, size = operation
            data = device.read(offset, size)
            assert isinstance(data, bytes) and len(data) == size
            if check_read:
                check_read(offset, data)
        elif kind == "write":
            device.write(operation[1], operation[2])


SERIAL_FEED = st.tuples(st.just("feed"), st.binary(max_size=64))


@settings(max_examples=300, deadline=None)
@given(accesses(list(range(8)), extra=[SERIAL_FEED]))
def test_serial_never_raises(operations):
    edges = []
    device = Serial(lambda data: None, lambda: edges.append(1), input_capacity=32)

    def check(offset, data):
        if offset == 5 and data:
            assert data[0] & 0x60 == 0x60, "THR is always empty"
        if offset == 2 and data:
            assert data[0] & 0x30 == 0, "never a 16750"

    for operation in operations:
        was_pending, edges_before = device.interrupt_pending, len(edges)
        if operation[0] == "feed":
            taken = device.feed(operation[1])
            assert 0 <= taken <= len(operation[1])
            assert 0 <= device.input_space() <= 32
        else:
            run(device, [operation], check)
        if device.interrupt_pending and not was_pending:
            assert len(edges) > edges_before, "the line rose without an edge"


@settings(max_examples=300, deadline=None)
@given(accesses([0]), accesses([0]))
def test_i8042_never_raises(data_operations, command_operations):
    resets = []
    device = I8042(on_reset=lambda: resets.append(1))

    def check(offset, data):
        if offset == 0 and data:
            assert not data[0] & 0x02, "IBF never set"

    for data_op, command_op in zip(data_operations, command_operations):
        run(device.data_port, [data_op])
        run(device.command_port, [command_op], check)


@settings(max_examples=300, deadline=None)
@given(accesses([0, 1]),
       st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
def test_rtc_never_raises(operations, now):
    device = Rtc(now=lambda: now)
    run(device, operations)
    device.write(0, b"\x0a")
    assert not device.read(1, 1)[0] & 0x80, "UIP is never stuck"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x32]),
                          st.integers(min_value=0, max_value=255)), max_size=60))
def test_rtc_clock_writes_never_break_reads(writes_):
    moment = datetime(2024, 2, 29, 13, 5, 9, tzinfo=timezone.utc).timestamp()
    device = Rtc(now=lambda: moment)
    for index, value in writes_:
        device.write(0, bytes([index]))
        device.write(1, bytes([value]))
    for index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32):
        device.write(0, bytes([index]))
        assert len(device.read(1, 1)) == 1


@settings(max_examples=300, deadline=None)
@given(accesses([0, 1, 2, 3, 4, 5, 8]), st.lists(st.booleans(), max_size=20))
def test_pm_never_raises(operations, presses):
    levels = []
    device = PowerManagement(on_power_off=lambda: None, on_reset=lambda: None, on_sci=levels.append)
    for operation, press in zip(operations, presses + [False] * len(operations)):
        run(device, [operation])
        if press:
            device.press_power_button()
    assert all(a != b for a, b in zip(levels, levels[1:])), "SCI reported on changes only"
    assert device.read(4, 2)[0] & 0x01, "SCI_EN always reads as set"
