"""What the device harnesses share: a guest queue laid out from fuzz input, and a watch
over what a device core does with it.

The queue part of an input (little-endian; missing bytes read as zero, so any byte string
is an input):
  u16  avail idx (the ring starts at 0, so this is how many chains are published, raw)
  u16  ring[size], then 16*size bytes of descriptor table
  the rest: the data area at DATA_ADDRESS (at most DATA_SIZE bytes)

The layout is FakeDriver(address=DESCRIPTOR_TABLE)'s, so seeds are written by a fake
driver and snapshotted with `queue_bytes`.
"""

from __future__ import annotations

import ctypes
import pathlib
import sys
from typing import Callable, Iterable

from sandvmm.devices.virtio.queue import (
    Chain,
    QueueConfig,
    SplitQueue,
    descriptor_table_size,
    device_area_size,
    driver_area_size,
)
from sandvmm.memory import GuestMemory

RAM_SIZE = 0x10000  # small, so that addresses the fuzzer makes up often land in RAM
DESCRIPTOR_TABLE = 0x1000
DATA_ADDRESS = 0x2000
DATA_SIZE = 0x3000
MAX_LOG2_SIZE = 4
ZERO = bytes(RAM_SIZE)


def fixed_layout(size: int, table: int = DESCRIPTOR_TABLE) -> QueueConfig:
    driver_area = table + descriptor_table_size(size)
    device_area = (driver_area + driver_area_size(size) + 3) & ~3
    return QueueConfig(size, table, driver_area, device_area)


def queue_size(options: int) -> int:
    """The queue size an options byte asks for in its low 3 bits."""
    return 1 << min(options & 7, MAX_LOG2_SIZE)


def load_queue(memory: GuestMemory, provider, size: int) -> QueueConfig:
    """Clear guest RAM and lay out one queue and the data area from the fuzzer's bytes."""
    config = fixed_layout(size)
    published = provider.ConsumeUInt(2)
    ring = provider.ConsumeBytes(2 * size).ljust(2 * size, b"\0")
    table = provider.ConsumeBytes(descriptor_table_size(size))
    memory.view[:] = ZERO
    memory.view[config.driver_area + 2:config.driver_area + 4 + 2 * size] = published.to_bytes(2, "little") + ring
    memory.view[DESCRIPTOR_TABLE:DESCRIPTOR_TABLE + len(table)] = table
    area = provider.ConsumeBytes(DATA_SIZE)
    memory.view[DATA_ADDRESS:DATA_ADDRESS + len(area)] = area
    return config


def queue_bytes(memory: GuestMemory, config: QueueConfig) -> bytes:
    """The queue part of an input, read back from what a fake driver wrote (for seeds)."""
    avail = memory.read(config.driver_area + 2, 2 + 2 * config.size)
    table = memory.read(config.descriptor_table, descriptor_table_size(config.size))
    return avail + table + memory.read(DATA_ADDRESS, DATA_SIZE).rstrip(b"\0")


class QueueWatch:
    """Wraps the queue's steps (taking a head, making its chain, offering a three-entry
    table to the core, publishing a used entry), checking as each chain completes that the
    core completes what it took, in order, with a length its writable buffers can hold.
    Both ways of draining a queue go through these steps: `serve()` and `pop()`/`add_used()`.

    `on_complete(chain, length)` may check more; chain is None for a malformed chain.
    """

    def __init__(self, queue: SplitQueue, config: QueueConfig,
                 on_complete: Callable[[Chain | None, int], None] = lambda c, n: None):
        self.config = config
        self.popped: list[tuple[int, Chain | None]] = []  # in the order the heads were taken
        self.completed = 0
        take_head, make_chain, publish_used, serve = queue._take_head, queue._chain, queue._publish_used, queue.serve

        def recording_take_head():
            head = take_head()
            self.popped.append((head, None))  # stays None if its chain is malformed
            return head

        def recording_chain(head):
            chain = make_chain(head)
            self.popped[-1] = (head, chain)
            return chain

        def watching_serve(handle, *, more=None, handle_three=None):
            def recording_three(*buffers):
                head = self.popped[-1][0]
                self.popped[-1] = (head, Chain.of_three(head, *buffers))
                return handle_three(*buffers)
            return serve(handle, more=more, handle_three=recording_three if handle_three else None)

        def checking_publish_used(head, length):
            # Checked now: a later chain's buffers may overlap this one's.
            expected_head, chain = self.popped[self.completed]
            self.completed += 1
            assert head == expected_head, "chains completed out of order"
            assert 0 <= length <= (chain.writable_length if chain else 0), f"used length {length}"
            on_complete(chain, length)
            publish_used(head, length)

        queue._take_head, queue._chain, queue._publish_used = recording_take_head, recording_chain, checking_publish_used
        queue.serve = watching_serve

    def writable_ranges(self, base: int):
        for _, chain in self.popped:
            for view in chain.writable if chain else ():
                if len(view):
                    start = ctypes.addressof(ctypes.c_char.from_buffer(view)) - base
                    yield start, start + len(view)


def memory_base(memory: GuestMemory) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(memory.view))


def check_device_run(memory: GuestMemory, before: bytes, watches: list[QueueWatch]) -> None:
    """After a core ran: every popped chain was completed, and guest RAM changed only in
    the popped chains' writable buffers and the queues' used rings."""
    after = bytes(memory.view)
    expected = bytearray(before)
    base = memory_base(memory)
    for watch in watches:
        assert watch.completed == len(watch.popped), "a popped chain was never completed"
        device_area = watch.config.device_area
        end = device_area + device_area_size(watch.config.size)
        expected[device_area:end] = after[device_area:end]
        for start, stop in watch.writable_ranges(base):
            expected[start:stop] = after[start:stop]
    assert expected == after, "the device wrote outside the offered buffers"


# ---- running a harness ---------------------------------------------------------------------

Seeds = Callable[[], Iterable[tuple[str, bytes, dict]]]  # (name, input, counts its run must give)
QUEUE_MAX_LEN = 2 + 18 * (1 << MAX_LOG2_SIZE) + DATA_SIZE  # the largest queue and its whole data area


def make_corpus(corpus: pathlib.Path, seeds: Seeds, run: Callable[[bytes], dict]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)  # other files there (merged finds) are kept
    for name, data, expected in seeds():
        counts = run(data)
        assert all(counts[key] == value for key, value in expected.items()), (name, counts)
        (corpus / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes, {counts}")


def harness_main(run: Callable[[bytes], dict], seeds: Seeds, corpus: pathlib.Path, header_bytes: int) -> None:
    """A device harness's command line: libFuzzer's, or --make-corpus to (re)write its seeds."""
    import atheris

    if sys.argv[1:] == ["--make-corpus"]:
        make_corpus(corpus, seeds, run)
        return
    argv = list(sys.argv)
    if not any(arg.startswith("-max_len=") for arg in argv):
        argv.append(f"-max_len={header_bytes + QUEUE_MAX_LEN}")

    def test_one_input(data: bytes) -> None:
        run(data)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
