"""virtio-blk data path benchmark: the device core alone against plain host preadv/pwritev.

    python3 benchmarks/block_core.py [--size-mib 256] [--rounds 3] [--dir /tmp]

No KVM and no guest: a FakeDriver offers requests the way Linux's virtio_blk lays them out
(an indirect table of header, data segments, status byte) in a memfd standing in for guest
RAM, and BlockCore serves them from a file through the disk layer (RawDisk when it is
there, else a minimal preadv/pwritev disk). Only `BlockCore.process()` is timed: popping
the chains, parsing, the disk call and completing them; preparing the requests is the
guest's work and is not counted. The host column is the best a Python program can do for
the same I/O: preadv/pwritev of the same segments, one call per request, no virtqueue, into
the same kind of memory (the guest RAM memfd, buffers rotating through 32 MiB as the
driver's do: a single hot buffer would flatter the host side).

Both sides hit the same warm page cache (the file is read once before timing), so the
ratio is the device core's overhead per request, not storage speed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from sandvmm.devices.block.core import HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockCore
from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import SplitQueue
from sandvmm.memory import GuestMemory, MiB

KiB = 1 << 10
ARENA = 32 * MiB  # the driver's buffers, and as much again for the host side's
HOST_AREA = 40 * MiB  # where the host side's buffers start, past the driver's


class PlainRawDisk:
    """Used only when sandvmm's RawDisk is not there: one preadv/pwritev per request."""

    def __init__(self, fd: int, read_only: bool = False):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.read_only = read_only

    def read_into(self, offset, buffers):
        os.preadv(self.fd, buffers, offset)

    def write_from(self, offset, buffers):
        os.pwritev(self.fd, buffers, offset)

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        raise NotImplementedError

    write_zeroes = discard


def open_disk(fd: int):
    try:
        from sandvmm.devices.block.disk import RawDisk
    except ImportError:
        return PlainRawDisk(fd), "PlainRawDisk (benchmark's own)"
    return RawDisk(fd, read_only=False, name="bench"), "RawDisk"


# (name, request size, segment size, random offsets, write, requests per kick, requests per round)
WORKLOADS = [
    ("4 KiB random read", 4 * KiB, 4 * KiB, True, False, 32, 32 * 600),
    ("4 KiB random write", 4 * KiB, 4 * KiB, True, True, 32, 32 * 600),
    ("1 MiB sequential read", 1 * MiB, 16 * KiB, False, False, 8, 8 * 40),
    ("1 MiB sequential write", 1 * MiB, 16 * KiB, False, True, 8, 8 * 40),
    # What Linux sends for 1 MiB of scattered 4 KiB pages: seg_max (254) segments, so
    # 1016 KiB; the driver merges pages that are contiguous, so 4 KiB is the worst case.
    ("1016 KiB seq read, 4 KiB pages", 254 * 4 * KiB, 4 * KiB, False, False, 8, 8 * 40),
    ("1016 KiB seq write, 4 KiB pages", 254 * 4 * KiB, 4 * KiB, False, True, 8, 8 * 40),
]


def offsets(count: int, request: int, file_size: int, is_random: bool, rng: random.Random) -> list[int]:
    slots = file_size // request
    if is_random:
        return [rng.randrange(slots) * request for _ in range(count)]
    return [(index % slots) * request for index in range(count)]


def time_core(core, driver, places, request, segment, write, depth) -> float:
    """Seconds spent in core.process() serving every offset in `places`."""
    segments = request // segment
    payload = [os.urandom(segment)] * segments if write else []
    spent = 0.0
    for batch in range(0, len(places), depth):
        heads = []
        for offset in places[batch:batch + depth]:
            sector = offset // 512
            if write:
                heads.append(driver.add_chain(readable=[HEADER.pack(VIRTIO_BLK_T_OUT, sector), *payload],
                                              writable=[1], indirect=True, publish=False))
            else:
                heads.append(driver.add_chain(readable=[HEADER.pack(VIRTIO_BLK_T_IN, sector)],
                                              writable=[segment] * segments + [1], indirect=True, publish=False))
        driver.publish()
        started = time.perf_counter()
        while core.process(0):  # a call stops after a slice of data, as in the device's loop
            pass
        spent += time.perf_counter() - started
        used = driver.used()
        assert len(used) == len(heads), "the core did not complete every request"
        if batch == 0:  # spot check: a failing disk must not pass for a fast one
            assert driver.written_data(heads[0])[-1] == VIRTIO_BLK_S_OK
    return spent


def time_host(fd, area: memoryview, places, request, segment, write) -> float:
    """Seconds for one preadv/pwritev per request, into the next request-sized piece of `area`.

    Guest RAM, rotating like the driver's buffers: the destination memory (a memfd, where
    the cache lines are cold) costs the same on both sides. Slicing is done before timing.
    """
    slots = [[area[base + start:base + start + segment] for start in range(0, request, segment)]
             for base in range(0, len(area) - request + 1, request)]
    call = os.pwritev if write else os.preadv
    started = time.perf_counter()
    for index, offset in enumerate(places):
        call(fd, slots[index % len(slots)], offset)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of the disk file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload; the median counts")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the disk file goes")
    args = parser.parse_args()

    file_size = args.size_mib * MiB
    fd, path = tempfile.mkstemp(prefix="sandvmm-block-bench-", dir=args.dir)
    try:
        os.unlink(path)
        chunk = os.urandom(MiB)
        for offset in range(0, file_size, MiB):
            os.pwrite(fd, chunk, offset)
        for offset in range(0, file_size, MiB):
            os.pread(fd, MiB, offset)  # warm the page cache for both sides
        disk, disk_name = open_disk(fd)
        memory = GuestMemory(HOST_AREA + ARENA, name="bench-guest-ram")
        driver = FakeDriver(memory, size=256, address=0x10000, data_size=ARENA)
        queue = SplitQueue(memory, driver.config, event_idx=True, indirect=True)
        core = BlockCore(disk)
        core.activate(core.features, {0: queue})
        host_area = memory.slice(HOST_AREA, ARENA)
        rng = random.Random(1)

        print(f"virtio-blk core vs host preadv/pwritev, {args.size_mib} MiB file in {args.dir} "
              f"(page cache), disk: {disk_name}, median of {args.rounds} rounds, Python {sys.version.split()[0]}")
        print(f"{'workload':32} {'core MB/s':>10} {'core IOPS':>10} {'host MB/s':>10} {'host IOPS':>10}"
              f" {'core/host':>10} {'core µs/req':>12}")
        for name, request, segment, is_random, write, depth, count in WORKLOADS:
            core_times, host_times = [], []
            for _ in range(args.rounds):
                places = offsets(count, request, file_size, is_random, rng)
                core_times.append(time_core(core, driver, places, request, segment, write, depth))
                host_times.append(time_host(fd, host_area, places, request, segment, write))
            core_rate = count / statistics.median(core_times)
            host_rate = count / statistics.median(host_times)
            print(f"{name:32} {core_rate * request / 1e6:10.0f} {core_rate:10.0f} {host_rate * request / 1e6:10.0f}"
                  f" {host_rate:10.0f} {core_rate / host_rate:10.2f} {1e6 / core_rate:12.1f}")
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
