"""The rng and console device cores, driven through a fake driver without KVM or processes."""

import struct

import pytest

from sandvmm.devices.console.core import (
    CONSOLE_PORT, CONTROL, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE, DEVICE_ADD, DEVICE_READY,
    EMERG_WR_OFFSET, MAX_PENDING_CONTROL, MAX_PENDING_INPUT, PORT_OPEN, PORT_READY, RECEIVE_QUEUE, TRANSMIT_QUEUE,
    VIRTIO_CONSOLE_F_MULTIPORT, ConsoleCore,
)
from sandvmm.devices.rng.core import MAX_REQUEST, RngCore
from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import GuestError, SplitQueue
from sandvmm.memory import MiB, GuestMemory


@pytest.fixture(scope="module")
def memory():
    return GuestMemory(16 * MiB)  # queues keep views of it alive, so it is never closed


def queue_pair(memory, address=0x10000, size=16):
    driver = FakeDriver(memory, size=size, address=address, data_size=2 * MiB)
    return driver, SplitQueue(memory, driver.config, event_idx=False, indirect=True)


def counting_source():
    state = {"next": 0}

    def entropy(size):
        data = bytes((state["next"] + i) & 0xFF for i in range(size))
        state["next"] += size
        return data
    return entropy


def test_rng_fills_every_offered_buffer(memory):
    driver, queue = queue_pair(memory)
    core = RngCore(counting_source())
    core.activate(0, {0: queue})
    first = driver.add_chain(writable=[16])
    second = driver.add_chain(writable=[8, 8], indirect=True)
    assert core.process(0) == [0]
    assert driver.used() == [(first, 16), (second, 16)]
    assert driver.written_data(first) == bytes(range(16))
    assert driver.written_data(second) == bytes(range(16, 32))
    assert core.process(0) == []  # nothing new: no interrupt wanted


def test_rng_caps_one_request_and_ignores_other_queues(memory):
    driver, queue = queue_pair(memory)
    core = RngCore(counting_source())
    core.activate(0, {0: queue})
    head = driver.add_chain(writable=[MAX_REQUEST + 4096])
    assert core.process(1) == []
    assert core.process(0) == [0]
    assert driver.used() == [(head, MAX_REQUEST)]


def test_rng_completes_a_malformed_chain_with_nothing_and_goes_on(memory):
    driver, queue = queue_pair(memory)
    core = RngCore(counting_source())
    core.activate(0, {0: queue})
    (bad,) = driver.reserve(1)
    driver.write_descriptor(bad, 0xFFFF_FFFF_0000, 64, 2)  # writable, but not guest RAM
    driver.offer(bad)
    good = driver.add_chain(writable=[4])
    assert core.process(0) == [0]
    assert driver.used() == [(bad, 0), (good, 4)]


def test_rng_before_activation_and_after_reset_does_nothing(memory):
    driver, queue = queue_pair(memory)
    core = RngCore(counting_source())
    driver.add_chain(writable=[4])
    assert core.process(0) == []
    core.activate(0, {0: queue})
    core.reset()
    assert core.process(0) == [] and driver.used() == []


def test_a_broken_ring_is_the_shells_business(memory):
    driver, queue = queue_pair(memory)
    core = RngCore(counting_source())
    core.activate(0, {0: queue})
    driver.set_available_idx(1000)  # more chains than the ring holds
    with pytest.raises(GuestError) as raised:
        core.process(0)
    assert raised.value.head is None


def console(memory):
    """A console whose driver did not take MULTIPORT: its one port takes input at once."""
    out = []
    receive_driver, receive_queue = queue_pair(memory, address=0x10000)
    transmit_driver, transmit_queue = queue_pair(memory, address=0x400000)
    core = ConsoleCore(out.append)
    core.activate(0, {RECEIVE_QUEUE: receive_queue, TRANSMIT_QUEUE: transmit_queue})
    return core, out, receive_driver, transmit_driver


def multiport_console(memory):
    """A console with MULTIPORT and its control queues, as Linux sets it up."""
    drivers, queues = {}, {}
    for index in (RECEIVE_QUEUE, TRANSMIT_QUEUE, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE):
        drivers[index], queues[index] = queue_pair(memory, address=0x10000 + index * 0x300000)
    core = ConsoleCore(lambda data: None)
    core.activate(1 << VIRTIO_CONSOLE_F_MULTIPORT, queues)
    return core, drivers


def control_messages(driver) -> list[tuple[int, int, int]]:
    return [CONTROL.unpack(driver.written_data(head, length)) for head, length in driver.used()]


def send_control(core, drivers, port: int, event: int, value: int = 1, message: bytes | None = None) -> list[int]:
    """The driver sends one control message; the device must take it and write nothing back."""
    control_out = drivers[CONTROL_TRANSMIT_QUEUE]
    head = control_out.add_chain(readable=[CONTROL.pack(port, event, value) if message is None else message])
    used = core.process(CONTROL_TRANSMIT_QUEUE)
    assert control_out.used() == [(head, 0)]
    return used


def test_multiport_input_waits_until_the_guest_opens_its_port(memory):
    core, drivers = multiport_console(memory)
    control_in, receive = drivers[CONTROL_RECEIVE_QUEUE], drivers[RECEIVE_QUEUE]
    for _ in range(4):
        control_in.add_chain(writable=[CONTROL.size])
    head = receive.add_chain(writable=[64])
    assert core.feed(b"early input\n")
    assert core.process(RECEIVE_QUEUE) == []  # buffers, but the port is not set up in the guest yet

    assert send_control(core, drivers, 0, DEVICE_READY) == [CONTROL_TRANSMIT_QUEUE, CONTROL_RECEIVE_QUEUE]
    assert control_messages(control_in) == [(0, DEVICE_ADD, 1)]
    send_control(core, drivers, 0, PORT_READY)
    assert control_messages(control_in) == [(0, CONSOLE_PORT, 1), (0, PORT_OPEN, 1)]
    assert receive.used() == []

    assert send_control(core, drivers, 0, PORT_OPEN) == [CONTROL_TRANSMIT_QUEUE, RECEIVE_QUEUE]
    assert receive.used() == [(head, 12)] and receive.written_data(head, 12) == b"early input\n"


def test_multiport_control_replies_wait_for_buffers_and_junk_is_ignored(memory):
    core, drivers = multiport_console(memory)
    control_in = drivers[CONTROL_RECEIVE_QUEUE]
    send_control(core, drivers, 0, 0, message=b"\x01\x02")  # too short to be a message
    send_control(core, drivers, 7, PORT_READY)  # a port we do not have
    send_control(core, drivers, 0, 0x99)  # an unknown event
    assert core.pending_control == [] and not core.port_open
    for _ in range(MAX_PENDING_CONTROL + 10):
        send_control(core, drivers, 0, DEVICE_READY)
    assert control_in.used() == []  # no buffers yet: nothing lost, nothing unbounded
    small = control_in.add_chain(writable=[4])
    fitting = control_in.add_chain(writable=[CONTROL.size])
    assert core.process(CONTROL_RECEIVE_QUEUE) == [CONTROL_RECEIVE_QUEUE]
    assert control_in.used() == [(small, 0), (fitting, CONTROL.size)]
    assert CONTROL.unpack(control_in.written_data(fitting)) == (0, DEVICE_ADD, 1)
    assert len(core.pending_control) == MAX_PENDING_CONTROL - 1


def test_multiport_port_closed_again_holds_input(memory):
    core, drivers = multiport_console(memory)
    send_control(core, drivers, 0, PORT_OPEN, 1)
    send_control(core, drivers, 0, PORT_OPEN, 0)
    drivers[RECEIVE_QUEUE].add_chain(writable=[16])
    assert core.feed(b"x") and core.process(RECEIVE_QUEUE) == []
    core.reset()
    assert core.process(CONTROL_TRANSMIT_QUEUE) == [] and not core.port_open


def test_console_output_reaches_the_sink_in_order(memory):
    core, out, _, transmit = console(memory)
    first = transmit.add_chain(readable=[b"hello, "])
    second = transmit.add_chain(readable=[b"wor", b"ld\n"])
    assert core.process(TRANSMIT_QUEUE) == [TRANSMIT_QUEUE]
    assert b"".join(out) == b"hello, world\n"
    assert transmit.used() == [(first, 0), (second, 0)]


def test_console_input_waits_for_buffers_and_is_never_dropped(memory):
    core, _, receive, _ = console(memory)
    assert core.feed(b"abcdefgh")
    assert core.process(RECEIVE_QUEUE) == []  # no buffer offered yet
    head = receive.add_chain(writable=[5])
    assert core.process(RECEIVE_QUEUE) == [RECEIVE_QUEUE]
    assert receive.used() == [(head, 5)] and receive.written_data(head) == b"abcde"
    spare = receive.add_chain(writable=[64])
    later = receive.add_chain(writable=[64])
    assert core.process(RECEIVE_QUEUE) == [RECEIVE_QUEUE]
    assert receive.used() == [(spare, 3)] and receive.written_data(spare, 3) == b"fgh"
    assert core.feed(b"z") and core.process(RECEIVE_QUEUE) == [RECEIVE_QUEUE]
    assert receive.used() == [(later, 1)]


def test_console_input_backlog_is_bounded(memory):
    core, _, _, _ = console(memory)
    assert core.feed(bytes(MAX_PENDING_INPUT))
    assert not core.feed(b"x")


def test_console_config_and_emergency_write(memory):
    core, out, _, _ = console(memory)
    cols, rows, ports, emergency = struct.unpack("<HHII", core.config_read(0, 12))
    assert (cols, rows, ports, emergency) == (0, 0, 1, 0)
    assert core.config_read(10, 8) == bytes(8)  # past the end reads zeros
    core.config_write(EMERG_WR_OFFSET, b"!\0\0\0")
    assert out == [b"!"]
