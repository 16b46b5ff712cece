"""Fuzz the virtio-blk device core (sandvmm/devices/block/core.py) with atheris.

    python3 tests/fuzz/fuzz_block_request.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python3 tests/fuzz/fuzz_block_request.py --make-corpus   # (re)writes corpus/block_request/

Each input is one guest's request queue: its ring, descriptor table and a data area where
buffers (headers, data, discard segments, indirect tables) live. The harness negotiates
the features the input asks for and lets BlockCore.process drain the queue over a small
in-memory disk. A GuestError without a head (a broken ring) is the guest's fault and
fine; any other exception, or a broken invariant, is a finding:
  - every used entry names a popped chain, and its length fits that chain's writable part;
  - an entry with a length has a status (OK, IOERR or UNSUPP) in the chain's last writable byte;
  - nothing outside the popped chains' writable buffers (and the used ring) changed;
  - the disk is only called inside its size, and never to write when read-only.

Input layout (little-endian; missing bytes read as zero, so any byte string is an input):
  u8   options: bits 0-2 log2(queue size) (capped at 4), bit 3 EVENT_IDX, bit 4 INDIRECT_DESC,
       bit 5 read-only disk, bit 6 discard off (crosvm's sparse=false), bit 7 the driver
       takes none of the device's own features (no DISCARD/WRITE_ZEROES negotiated)
  u16  avail idx (the ring starts at 0, so this is how many chains are published, raw)
  u16  ring[size], then 16*size bytes of descriptor table
  the rest: the data area at DATA_ADDRESS (at most DATA_SIZE bytes)
"""

import pathlib

import atheris

with atheris.instrument_imports(include=["sandvmm.devices.block.core", "sandvmm.devices.virtio"]):
    from sandvmm.devices.block.core import HEADER, SEGMENT, BlockCore
    from sandvmm.devices.virtio.device import RING_FEATURES
    from sandvmm.devices.virtio.queue import GuestError, SplitQueue

from sandvmm.memory import GuestMemory
from tests.fuzz.device_queue import (
    DATA_ADDRESS, DATA_SIZE, DESCRIPTOR_TABLE, MAX_LOG2_SIZE, RAM_SIZE, QueueWatch, check_device_run, fixed_layout,
    harness_main, load_queue, queue_bytes, queue_size,
)

DISK_SECTORS = 64
CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "block_request"

memory = GuestMemory(RAM_SIZE, name="fuzz-block")  # one memfd for every run: creating one is slow
DISK_PATTERN = bytes(range(256)) * (DISK_SECTORS * 512 // 256)


class CheckedDisk:
    """A bytearray disk that asserts every call stays inside it."""

    def __init__(self, read_only: bool):
        self.size = len(DISK_PATTERN)
        self.read_only = read_only
        self.data = bytearray(DISK_PATTERN)

    def _check(self, offset: int, length: int, writes: bool) -> None:
        assert 0 <= offset and 0 <= length and offset + length <= self.size, (offset, length)
        assert not (writes and self.read_only), "a write reached a read-only disk"

    def read_into(self, offset, buffers):
        self._check(offset, sum(map(len, buffers)), False)
        for buffer in buffers:
            buffer[:] = self.data[offset:offset + len(buffer)]
            offset += len(buffer)

    def write_from(self, offset, buffers):
        self._check(offset, sum(map(len, buffers)), True)
        for buffer in buffers:
            self.data[offset:offset + len(buffer)] = buffer
            offset += len(buffer)

    def flush(self):
        pass

    def discard(self, offset, length):
        self._check(offset, length, True)
        self.data[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset, length, unmap):
        self.discard(offset, length)


def run(data: bytes) -> dict:
    """Play one input. Returns counts of the statuses (for the corpus check and for curiosity)."""
    provider = atheris.FuzzedDataProvider(data)
    options = provider.ConsumeUInt(1)
    config = load_queue(memory, provider, queue_size(options))
    disk = CheckedDisk(read_only=bool(options & 32))
    core = BlockCore(disk, serial="fuzz", discard=not options & 64, queue_size=1 << MAX_LOG2_SIZE)
    features = RING_FEATURES if options & 128 else core.features
    queue = SplitQueue(memory, config, event_idx=bool(options & 8), indirect=bool(options & 16))
    core.activate(features, {0: queue})

    counts = {"ok": 0, "ioerr": 0, "unsupp": 0, "no status": 0, "bad chains": 0, "ring errors": 0}

    def on_complete(chain, length):
        if chain is None:
            assert length == 0
            counts["bad chains"] += 1
        elif not chain.writable_length:
            assert length == 0
            counts["no status"] += 1
        else:
            assert length >= 1, length
            status = next(view for view in reversed(chain.writable) if len(view))[-1]
            assert status in (0, 1, 2), f"status {status}"
            counts[("ok", "ioerr", "unsupp")[status]] += 1

    watch = QueueWatch(queue, config, on_complete)
    before = bytes(memory.view)
    try:
        while core.process(0):  # a slice at a time, as the device's loop calls it
            pass
    except GuestError as error:
        assert error.head is None, "a chain error escaped the core"
        counts["ring errors"] += 1
    check_device_run(memory, before, [watch])
    return counts



# ---- the seed corpus -----------------------------------------------------------------------

def seeds():
    """(name, input, counts it must produce): requests a well-behaved driver makes, and a few bad ones."""
    from sandvmm.devices.virtio.driver import FakeDriver

    def snapshot(driver, options: int) -> bytes:
        return bytes([options | (driver.config.size.bit_length() - 1)]) + queue_bytes(memory, driver.config)

    def new_driver(size=16):
        memory.view[:] = bytes(RAM_SIZE)
        driver = FakeDriver(memory, size, address=DESCRIPTOR_TABLE, data_size=DATA_SIZE)
        assert driver.config == fixed_layout(size) and driver.data_address == DATA_ADDRESS
        return driver

    def header(request_type, sector=0):
        return HEADER.pack(request_type, sector)

    driver = new_driver()
    driver.add_chain(readable=[header(1, 2), bytes(range(256)) * 4], writable=[1])
    driver.add_chain(readable=[header(0, 2)], writable=[512, 512, 1])
    driver.add_chain(readable=[header(4)], writable=[1])
    yield "write-read-flush", snapshot(driver, 0), {"ok": 3}

    driver = new_driver()
    driver.add_chain(readable=[header(0, 8)], writable=[100, 412, 1], indirect=True)
    driver.add_chain(readable=[header(1, 9)[:5], header(1, 9)[5:] + bytes(512)], writable=[1], indirect=True)
    yield "indirect-and-split-header", snapshot(driver, 16), {"ok": 2}

    driver = new_driver()
    driver.add_chain(readable=[header(11), SEGMENT.pack(0, 8, 0) + SEGMENT.pack(16, 8, 0)], writable=[1])
    driver.add_chain(readable=[header(13), SEGMENT.pack(4, 2, 1)], writable=[1])
    driver.add_chain(readable=[header(11), SEGMENT.pack(4, 2, 1)], writable=[1])  # unmap on discard
    yield "discard-write-zeroes", snapshot(driver, 0), {"ok": 2, "unsupp": 1}

    driver = new_driver()
    driver.add_chain(readable=[header(8)], writable=[20, 1])
    driver.add_chain(readable=[header(10)], writable=[16, 1])  # GET_LIFETIME: not offered
    driver.add_chain(readable=[header(0, DISK_SECTORS)], writable=[512, 1])  # past the end
    driver.add_chain(readable=[header(1, 0), bytes(512)])  # no status byte
    yield "get-id-and-errors", snapshot(driver, 0), {"ok": 1, "unsupp": 1, "ioerr": 1, "no status": 1}

    driver = new_driver(8)
    driver.add_chain(readable=[header(1, 0), bytes(512)], writable=[1])
    driver.add_chain(readable=[header(0, 0)], writable=[512, 1])
    yield "read-only", snapshot(driver, 32), {"ok": 1, "ioerr": 1}


    driver = new_driver(8)
    (bad,) = driver.reserve(1)
    driver.write_descriptor(bad, 0xFFFF_0000, 16)  # not guest RAM: a malformed chain, then a good one
    driver.offer(bad)
    driver.add_chain(readable=[header(0, 1)], writable=[512, 1])
    yield "bad-chain-then-good", snapshot(driver, 0), {"bad chains": 1, "ok": 1}


if __name__ == "__main__":
    harness_main(run, seeds, CORPUS, header_bytes=1)
