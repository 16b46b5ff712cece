"""Fuzz the virtio-console device core (sandvmm/devices/console/core.py) with atheris.

    python3 tests/fuzz/fuzz_console.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python3 tests/fuzz/fuzz_console.py --make-corpus   # (re)writes corpus/console/

Each input is one of the console's four queues as the guest wrote it (device_queue.py's
layout), plus host input fed before the device runs. The other three queues belong to a
well-behaved driver: a receive buffer, control buffers, a line of output, and the
multiport handshake (DEVICE_READY, PORT_READY, PORT_OPEN) on the control transmit queue.
The harness runs the fuzzed queue, then the handshake, then input delivery. Only a broken
ring (GuestError without a head) may leave the core; the checks on top of device_queue's:
  - host input is never duplicated or dropped: what receive buffers took plus what is
    still pending is as long as what was fed, and what is pending is its tail;
  - every output byte comes from a transmit chain's readable part;
  - control replies never pile up past MAX_PENDING_CONTROL.

Input layout (little-endian; missing bytes read as zero):
  u8   options: bits 0-2 log2(queue size) (capped at 4), bit 3 EVENT_IDX, bit 4
       INDIRECT_DESC, bit 5 MULTIPORT negotiated, bits 6-7 which queue is the fuzzed one
       (0 receive, 1 transmit, 2 control receive, 3 control transmit)
  u8   how many bytes of host input to feed
  the queue: device_queue.py's layout
"""

import pathlib

import atheris

with atheris.instrument_imports(include=["sandvmm.devices.console", "sandvmm.devices.virtio"]):
    from sandvmm.devices.console.core import (
        CONTROL, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE, DEVICE_READY, MAX_PENDING_CONTROL, PORT_OPEN,
        PORT_READY, RECEIVE_QUEUE, TRANSMIT_QUEUE, VIRTIO_CONSOLE_F_MULTIPORT, ConsoleCore,
    )
    from sandvmm.devices.virtio.device import RING_FEATURES
    from sandvmm.devices.virtio.queue import GuestError, SplitQueue

from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.memory import GuestMemory
from tests.fuzz.device_queue import (
    DESCRIPTOR_TABLE, RAM_SIZE, QueueWatch, check_device_run, harness_main, load_queue, queue_bytes, queue_size,
)

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "console"
QUEUES = (RECEIVE_QUEUE, TRANSMIT_QUEUE, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE)
DRIVER_AREAS = (0x6000, 0x8000, 0xA000, 0xC000)  # the well-behaved queues, past the fuzzed data area
INPUT = bytes(range(32, 127)) * 3

memory = GuestMemory(RAM_SIZE, name="fuzz-console")


def well_behaved(index: int) -> FakeDriver:
    driver = FakeDriver(memory, 8, address=DRIVER_AREAS[index], data_size=0x1000)
    if index == RECEIVE_QUEUE:
        driver.add_chain(writable=[64])
    elif index == TRANSMIT_QUEUE:
        driver.add_chain(readable=[b"from the guest\n"])
    elif index == CONTROL_RECEIVE_QUEUE:
        for _ in range(4):
            driver.add_chain(writable=[CONTROL.size])
    else:
        for event in (DEVICE_READY, PORT_READY, PORT_OPEN):
            driver.add_chain(readable=[CONTROL.pack(0, event, 1)])
    return driver


def run(data: bytes) -> dict:
    provider = atheris.FuzzedDataProvider(data)
    options = provider.ConsumeUInt(1)
    fed = INPUT[:provider.ConsumeUInt(1)]
    fuzzed = options >> 6
    configs = {fuzzed: load_queue(memory, provider, queue_size(options))}
    for index in QUEUES:
        if index != fuzzed:
            configs[index] = well_behaved(index).config

    output = bytearray()
    core = ConsoleCore(output.extend)
    features = RING_FEATURES | (1 << VIRTIO_CONSOLE_F_MULTIPORT if options & 32 else 0)
    queues = {index: SplitQueue(memory, configs[index], event_idx=bool(options & 8), indirect=bool(options & 16))
              for index in QUEUES}
    core.activate(features, queues)
    counts = {"delivered": 0, "transmitted": 0}

    def on_receive(chain, length):
        counts["delivered"] += length

    def on_transmit(chain, length):
        counts["transmitted"] += chain.readable_length if chain else 0

    hooks = {RECEIVE_QUEUE: on_receive, TRANSMIT_QUEUE: on_transmit}
    watches = [QueueWatch(queues[index], configs[index], hooks.get(index, lambda c, n: None)) for index in QUEUES]
    assert core.feed(fed)
    before = bytes(memory.view)
    order = [fuzzed] + [index for index in (CONTROL_TRANSMIT_QUEUE, RECEIVE_QUEUE, CONTROL_RECEIVE_QUEUE)
                        if index != fuzzed]
    ring_errors = 0
    for index in order:
        try:
            core.process(index)
        except GuestError as error:
            assert error.head is None, "a chain error escaped the core"
            ring_errors += 1
    check_device_run(memory, before, watches)
    # (Counted, not compared byte for byte: a chain's buffers may overlap and overwrite each other.)
    pending = bytes(core.pending_input)
    assert counts["delivered"] + len(pending) == len(fed) and fed.endswith(pending), "input dropped or duplicated"
    assert len(output) <= counts["transmitted"], "output that no transmit chain carried"
    assert len(core.pending_control) <= MAX_PENDING_CONTROL
    return {"delivered": counts["delivered"], "output": len(output), "ring errors": ring_errors,
            "control replies": watches[QUEUES.index(CONTROL_RECEIVE_QUEUE)].completed}



# ---- the seed corpus -----------------------------------------------------------------------

def seeds():
    """(name, input, counts it must produce)."""
    def snapshot(driver: FakeDriver, options: int, feed: int = 0) -> bytes:
        size = driver.config.size
        return bytes([options | (size.bit_length() - 1), feed]) + queue_bytes(memory, driver.config)

    def new_driver(size=8):
        memory.view[:] = bytes(RAM_SIZE)
        return FakeDriver(memory, size, address=DESCRIPTOR_TABLE, data_size=0x3000)

    multiport = 32
    driver = new_driver()
    driver.add_chain(readable=[b"hello, "])
    driver.add_chain(readable=[b"wor", b"ld\n"], indirect=True)
    yield "transmit", snapshot(driver, multiport | 16 | TRANSMIT_QUEUE << 6, feed=5), {"output": 13, "delivered": 5}

    driver = new_driver()
    driver.add_chain(writable=[5])
    driver.add_chain(writable=[3, 40])
    yield "receive-without-multiport", snapshot(driver, RECEIVE_QUEUE << 6, feed=30), {"delivered": 30}

    driver = new_driver()
    for event in (DEVICE_READY, PORT_READY, PORT_OPEN):
        driver.add_chain(readable=[CONTROL.pack(0, event, 1)])
    yield "handshake", snapshot(driver, multiport | CONTROL_TRANSMIT_QUEUE << 6, feed=10), \
        {"delivered": 10, "control replies": 3}

    driver = new_driver()
    for length in (8, 4, 8, 8):
        driver.add_chain(writable=[length])
    yield "control-receive", snapshot(driver, multiport | CONTROL_RECEIVE_QUEUE << 6), {"control replies": 4}


if __name__ == "__main__":
    harness_main(run, seeds, CORPUS, header_bytes=2)
