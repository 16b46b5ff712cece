"""Write the seed corpus of fuzz_virtqueue.py: queues a well-behaved driver (FakeDriver)
set up, plus a few classic mistakes, so that the fuzzer starts from deep states.

    python3 tests/fuzz/make_virtqueue_corpus.py   # (re)writes its seeds in tests/fuzz/corpus/virtqueue/

Each seed is checked by playing it through the harness: it must produce the chains (or
errors) it was made for, so a change to the input layout cannot silently empty the corpus.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import fuzz_virtqueue as harness  # noqa: E402  (after the path tweak)

from sandvmm.devices.virtio.driver import FakeDriver  # noqa: E402
from sandvmm.devices.virtio.queue import (  # noqa: E402
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueConfig,
)

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "virtqueue"
memory = harness.memory


def snapshot(driver: FakeDriver, *, start: int, actions: bytes = b"", **features) -> bytes:
    """The harness input that recreates this driver's queue as it stands in memory."""
    config = driver.config
    size = config.size
    avail = memory.read(config.driver_area, 6 + 2 * size)
    data = memory.read(harness.DATA_ADDRESS, harness.DATA_SIZE).rstrip(b"\0")
    return harness.encode(
        log2_size=size.bit_length() - 1, start=start, published=driver.available_idx,
        avail_flags=int.from_bytes(avail[:2], "little"), used_event=int.from_bytes(avail[-2:], "little"),
        ring=avail[4:-2], table=memory.read(config.descriptor_table, 16 * size),
        actions=actions, data=data, **features)


def new_driver(size: int, start: int = 0, event_idx: bool = False) -> FakeDriver:
    memory.view[:] = harness.ZERO
    driver = FakeDriver(memory, size, address=harness.DESCRIPTOR_TABLE, data_size=harness.DATA_SIZE,
                        start_index=start, event_idx=event_idx)
    assert driver.config == harness.fixed_layout(size) and driver.data_address == harness.DATA_ADDRESS
    return driver


def seeds():
    driver = new_driver(8)
    driver.add_chain(readable=[b"request header"], writable=[32])
    yield "one-chain", snapshot(driver, start=0), {"chains": 1}

    driver = new_driver(16, event_idx=True)
    driver.add_chain(readable=[b"a", b"bc"], writable=[4], publish=False)
    driver.add_chain(readable=[b"indirect"], writable=[8, 8, 3], indirect=True, publish=False)
    driver.add_chain(readable=[b""], writable=[0, 5], publish=False)
    driver.set_used_event(1)
    driver.publish()
    yield "mixed-event-idx", snapshot(driver, start=0, event_idx=True, indirect=True,
                                      actions=bytes([0, 3, 1, 4 | 1, 0])), {"chains": 3}

    start = 65533  # the indexes wrap while these are popped
    driver = new_driver(64, start=start)
    for length in range(1, 7):
        driver.add_chain(readable=[bytes([length]) * length], writable=[length] * 2,
                         indirect=length % 2 == 0, publish=False)
    driver.publish()
    yield "wrap-around", snapshot(driver, start=start, indirect=True, actions=bytes([1, 0, 2 | 4 << 2, 3])), \
        {"chains": 10}  # the 4 published later name descriptor 0 again

    driver = new_driver(4)  # direct descriptors followed by an indirect table
    first, second = driver.reserve(2)
    table = driver.allocate(32)
    buffers = driver.allocate(16)
    driver.write_descriptor(first, buffers, 4, VIRTQ_DESC_F_NEXT, second)
    driver.write_descriptor(second, table, 32, VIRTQ_DESC_F_INDIRECT)
    driver.write_table(table, [(buffers + 4, 4, VIRTQ_DESC_F_NEXT, 1), (buffers + 8, 8, VIRTQ_DESC_F_WRITE, 0)])
    driver.offer(first)
    yield "direct-then-indirect", snapshot(driver, start=0, indirect=True), {"chains": 1}

    driver = new_driver(4)  # a loop, then a good chain: the device must live on
    loop = driver.reserve(2)
    buffer = driver.allocate(8)
    driver.write_descriptor(loop[0], buffer, 8, VIRTQ_DESC_F_NEXT, loop[1])
    driver.write_descriptor(loop[1], buffer, 8, VIRTQ_DESC_F_NEXT, loop[0])
    driver.offer(loop[0])
    driver.add_chain(writable=[8])
    yield "loop-then-good", snapshot(driver, start=0), {"chains": 1, "bad chains": 1}

    driver = new_driver(8, event_idx=True)  # block requests of one buffer, served: taken, declined, then walked
    for _ in range(2):
        driver.add_chain(readable=[bytes(16)], writable=[512, 1], indirect=True, publish=False)
        driver.add_chain(readable=[bytes(16), bytes(512)], writable=[1], indirect=True, publish=False)
    driver.add_chain(readable=[bytes(16)], writable=[256, 256, 1], indirect=True, publish=False)
    driver.publish()
    yield "three-entry-served", snapshot(driver, start=0, event_idx=True, indirect=True,
                                         actions=bytes([4, 2 | 2 << 2, 4 | 8])), {"chains": 7, "three-entry": 4}

    driver = new_driver(2)  # the same queue, described through a raw configuration
    driver.add_chain(readable=[b"raw"], writable=[2])
    yield "raw-config", snapshot(driver, start=0, config=QueueConfig(*vars(driver.config).values())), \
        {"chains": 1}


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)  # other files there (merged finds) are kept
    for name, data, expected in seeds():
        counts = harness.run(data)
        assert all(counts[key] == value for key, value in expected.items()), (name, counts)
        (CORPUS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes, {counts}")


if __name__ == "__main__":
    main()
