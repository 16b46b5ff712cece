"""Fuzz the virtio-rng device core (sandvmm/devices/rng/core.py) with atheris.

    python3 tests/fuzz/fuzz_rng.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python3 tests/fuzz/fuzz_rng.py --make-corpus   # (re)writes corpus/rng/

Each input is the request queue as the guest wrote it (device_queue.py's layout). Only a
broken ring (GuestError without a head) may leave the core; the checks on top of
device_queue's: a well-formed chain is filled as far as it can hold (at most MAX_REQUEST),
a malformed one gets nothing, and the core asks its source for exactly what it hands out.

Input layout (little-endian; missing bytes read as zero):
  u8   options: bits 0-2 log2(queue size) (capped at 4), bit 3 EVENT_IDX, bit 4 INDIRECT_DESC
  the queue: device_queue.py's layout
"""

import pathlib

import atheris

with atheris.instrument_imports(include=["sandvmm.devices.rng", "sandvmm.devices.virtio"]):
    from sandvmm.devices.rng.core import MAX_REQUEST, REQUEST_QUEUE, RngCore
    from sandvmm.devices.virtio.device import RING_FEATURES
    from sandvmm.devices.virtio.queue import GuestError, SplitQueue

from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.memory import GuestMemory
from tests.fuzz.device_queue import (
    DESCRIPTOR_TABLE, RAM_SIZE, QueueWatch, check_device_run, harness_main, load_queue, queue_bytes, queue_size,
)

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "rng"

memory = GuestMemory(RAM_SIZE, name="fuzz-rng")


def run(data: bytes) -> dict:
    provider = atheris.FuzzedDataProvider(data)
    options = provider.ConsumeUInt(1)
    config = load_queue(memory, provider, queue_size(options))
    counts = {"asked": 0, "handed out": 0, "filled": 0, "bad chains": 0}

    def entropy(size: int) -> bytes:
        counts["asked"] += size
        return bytes(size)

    def on_complete(chain, length):
        counts["handed out"] += length
        if chain is None:
            counts["bad chains"] += 1
            assert length == 0
        else:
            assert length == min(chain.writable_length, MAX_REQUEST), (length, chain)
            counts["filled"] += 1

    core = RngCore(entropy)
    queue = SplitQueue(memory, config, event_idx=bool(options & 8), indirect=bool(options & 16))
    core.activate(RING_FEATURES, {REQUEST_QUEUE: queue})
    watch = QueueWatch(queue, config, on_complete)
    before = bytes(memory.view)
    try:
        core.process(REQUEST_QUEUE)
    except GuestError as error:
        assert error.head is None, "a chain error escaped the core"
    check_device_run(memory, before, [watch])
    assert counts["asked"] == counts["handed out"]
    return counts



def seeds():
    """(name, input, counts it must produce)."""
    memory.view[:] = bytes(RAM_SIZE)
    driver = FakeDriver(memory, 8, address=DESCRIPTOR_TABLE, data_size=0x3000)
    driver.add_chain(writable=[16])
    driver.add_chain(writable=[8, 24], indirect=True)
    (bad,) = driver.reserve(1)
    driver.write_descriptor(bad, 0xFFFF_0000, 16, 2)  # writable, but not guest RAM
    driver.offer(bad)
    yield "fill-indirect-and-bad", bytes([16 | 3]) + queue_bytes(memory, driver.config), \
        {"filled": 2, "bad chains": 1, "handed out": 48}


if __name__ == "__main__":
    harness_main(run, seeds, CORPUS, header_bytes=1)
