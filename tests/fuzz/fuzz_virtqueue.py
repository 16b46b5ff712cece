"""Fuzz the split virtqueue core (sandvmm/devices/virtio/queue.py) with atheris.

    python3 tests/fuzz/fuzz_virtqueue.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]

Each input is one guest's queue: the configuration, the rings, the descriptor table, a
data area (where indirect tables and buffers can point) and a few guest actions. The
harness plays the device: it pops (or serves) until the ring is empty or broken, reads
and writes every chain, completes it and asks about interrupts. A GuestError is the guest's fault
and fine; any other exception, or a broken invariant (an assert below), is a finding.

Input layout (every field read front to back, little-endian; missing bytes read as zero,
so any byte string is a valid input; make_virtqueue_corpus.py writes the same layout):
  u8   options: bits 0-2 log2(queue size) (capped at 6), bit 3 EVENT_IDX, bit 4
       INDIRECT_DESC, bit 5 raw configuration, bit 6 raw avail idx
  u16  start: where the queue's 16-bit indexes start (reaches the wrap-around)
  [raw configuration: u16 size, u16 descriptor table, u16 driver area, u16 device area]
  u16  avail idx (raw), or how many chains past `start` the driver published (mod size+1)
  u16  avail flags, u16 used_event
  u16  ring[size], then 16*size bytes of descriptor table (written where the config says)
  u8   action count (capped at 8), then one byte per action:
       low 2 bits 0: drain, by pop() (bit 2 clear) or by serve(), whose three-entry
       tables go to a handler that takes them (bit 3 clear) or declines them
       1: notifications on/off (bit 2)  2: publish more (bits 2-7)  3: needs_interrupt
  the rest: the data area at DATA_ADDRESS (at most DATA_SIZE bytes)
"""

import sys

import atheris

with atheris.instrument_imports(include=["sandvmm.devices.virtio"]):
    from sandvmm.devices.virtio.queue import (
        Chain,
        GuestError,
        QueueConfig,
        SplitQueue,
        descriptor_table_size,
    )

from sandvmm.memory import GuestMemory
from tests.fuzz.device_queue import fixed_layout

RAM_SIZE = 0x10000  # small, so that addresses the fuzzer makes up often land in RAM
DESCRIPTOR_TABLE = 0x1000  # the fixed layout is the fake driver's (FakeDriver(address=0x1000))
DATA_ADDRESS = 0x2000
DATA_SIZE = 0x1000
MAX_LOG2_SIZE = 6
MAX_ACTIONS = 8
MAX_FILL = 1 << 20  # a chain's buffers may overlap, so they can add up to more than RAM

memory = GuestMemory(RAM_SIZE, name="fuzz-virtqueue")  # one memfd for every run: creating one is slow
ZERO = bytes(RAM_SIZE)
FILL = bytes(range(256)) * (MAX_FILL // 256)


def write_clipped(address: int, data: bytes) -> None:
    """Guest bytes land wherever they fall inside RAM; what falls outside is dropped."""
    data = data[:max(0, RAM_SIZE - address)]
    memory.view[address:address + len(data)] = data


def check_chain(chain) -> int:
    """Use a chain the way a device would, checking what the core promises. Returns bytes written."""
    assert 0 <= chain.head < 1 << 15
    assert sum(map(len, chain.readable)) == chain.readable_length
    assert sum(map(len, chain.writable)) == chain.writable_length
    for view in chain.readable + chain.writable:
        assert view.obj is memory.mapping, "a view outside guest RAM"
    assert all(view.readonly for view in chain.readable)
    data = chain.read()
    assert len(data) == chain.readable_length
    assert chain.read(5, offset=3) == data[3:8]
    assert sum(map(len, chain.writable_views(1, 7))) == max(0, min(7, chain.writable_length - 1))
    fill = FILL[:min(chain.writable_length, MAX_FILL)]
    written = chain.write(fill)
    assert written == len(fill)
    return written


def run(data: bytes) -> dict:
    """Play one input. Returns counts of what happened (for the corpus script and for curiosity)."""
    provider = atheris.FuzzedDataProvider(data)
    options = provider.ConsumeUInt(1)
    size = 1 << min(options & 7, MAX_LOG2_SIZE)
    event_idx, indirect = bool(options & 8), bool(options & 16)
    start = provider.ConsumeUInt(2)
    if options & 32:
        config = QueueConfig(*(provider.ConsumeUInt(2) for _ in range(4)))
    else:
        config = fixed_layout(size)
    ring_size = config.size if 1 <= config.size <= 1 << MAX_LOG2_SIZE else size
    published = provider.ConsumeUInt(2)
    if not options & 64:
        published = (start + published % (ring_size + 1)) & 0xFFFF
    avail_flags, used_event = provider.ConsumeUInt(2), provider.ConsumeUInt(2)
    ring = provider.ConsumeBytes(2 * ring_size).ljust(2 * ring_size, b"\0")
    avail = (avail_flags.to_bytes(2, "little") + published.to_bytes(2, "little") + ring
             + used_event.to_bytes(2, "little"))
    table = provider.ConsumeBytes(descriptor_table_size(ring_size))
    actions = provider.ConsumeBytes(min(provider.ConsumeUInt(1), MAX_ACTIONS))
    memory.view[:] = ZERO
    write_clipped(DATA_ADDRESS, provider.ConsumeBytes(DATA_SIZE))
    write_clipped(config.descriptor_table, table)
    write_clipped(config.driver_area, avail)
    counts = {"chains": 0, "bad chains": 0, "ring errors": 0}
    try:
        queue = SplitQueue(memory, config, event_idx=event_idx, indirect=indirect,
                           last_available=start, next_used=start)
    except GuestError:
        counts["ring errors"] += 1
        return counts
    try:
        for action in actions + b"\0":  # always end with a drain
            kind = action & 3
            if kind == 0 and action & 4:
                serve(queue, counts, take_three=not action & 8)
            elif kind == 0:
                drain(queue, counts)
            elif kind == 1:
                queue.set_notifications(bool(action & 4))
                if action & 4:
                    queue.has_available()  # the re-check a device makes after re-enabling
            elif kind == 2:
                avail_idx = memory.view[config.driver_area + 2:config.driver_area + 4]
                value = (int.from_bytes(avail_idx, "little") + (action >> 2)) & 0xFFFF
                avail_idx[:] = value.to_bytes(2, "little")
            else:
                queue.needs_interrupt()
    except GuestError as error:
        assert error.head is None, "only drain() handles chain errors"
        counts["ring errors"] += 1
    return counts


def drain(queue, counts) -> None:
    # Bounded: a guest whose buffers overlap its own avail ring can keep the ring full forever.
    for _ in range(2 * queue.size + 2):
        try:
            chain = queue.pop()
        except GuestError as error:
            if error.head is None:
                raise
            assert 0 <= error.head < queue.size
            counts["bad chains"] += 1
            queue.add_used(error.head, 0)
            continue
        if chain is None:
            break
        counts["chains"] += 1
        queue.add_used(chain.head, check_chain(chain))
    queue.needs_interrupt()


def serve(queue, counts, take_three: bool) -> None:
    budget = iter(range(2 * queue.size + 2))  # bounded, as drain() is
    handled = 0

    def handle(chain):
        nonlocal handled
        handled += 1
        return check_chain(chain)

    def handle_three(header, data, data_is_writable, status):
        nonlocal handled
        assert header.readonly and data.readonly != data_is_writable and not status.readonly
        if not take_three:
            return None  # the queue makes the Chain and hands it to handle()
        handled += 1
        counts["three-entry"] = counts.get("three-entry", 0) + 1
        chain = Chain.of_three(0, header, data, data_is_writable, status)
        assert (chain.readable_length, chain.writable_length) == (
            len(header) + (0 if data_is_writable else len(data)), len(status) + (len(data) if data_is_writable else 0))
        return check_chain(chain)

    completed = queue.serve(handle, more=lambda: next(budget, None) is not None, handle_three=handle_three)
    counts["chains"] += handled
    counts["bad chains"] += completed - handled
    queue.needs_interrupt()


def encode(*, log2_size: int, start: int, published: int, avail_flags: int = 0, used_event: int = 0,
           ring: bytes = b"", table: bytes = b"", event_idx: bool = False, indirect: bool = False,
           config: QueueConfig | None = None, actions: bytes = b"", data: bytes = b"") -> bytes:
    """An input in the layout above (raw avail idx), for seed corpora."""
    options = log2_size | event_idx << 3 | indirect << 4 | (config is not None) << 5 | 1 << 6
    header = bytes([options]) + start.to_bytes(2, "little")
    if config is not None:
        header += b"".join(value.to_bytes(2, "little") for value in (
            config.size, config.descriptor_table, config.driver_area, config.device_area))
    return (header + b"".join(value.to_bytes(2, "little") for value in (published, avail_flags, used_event))
            + ring + table + bytes([len(actions)]) + actions + data)


def TestOneInput(data: bytes) -> None:
    run(data)


def main() -> None:
    argv = list(sys.argv)
    if not any(arg.startswith("-max_len=") for arg in argv):
        argv.append("-max_len=8192")  # big enough for a 64-entry queue and its data area
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
