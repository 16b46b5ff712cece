"""What a driver on another CPU sees of the device area while the device writes it.

The guest reads the used ring while the device child writes it, each on a CPU of its own.
A forked observer stands in for the guest here: it reads the rings through raw loads, as
the guest's driver does, while this process serves chains. Every value it sees must be one
the device meant to publish. (struct.pack_into zeroes a field before writing it: a driver
that read that zero as the used idx took entries of an earlier lap for new ones, which is
how a 2-vCPU lab saw Linux's "id N is not a head!".)
"""

import ctypes
import json
import os
import select
import signal
import struct

from sandvmm.devices.virtio.driver import FakeDriver
from sandvmm.devices.virtio.queue import SplitQueue
from sandvmm.memory import MiB, GuestMemory

START = 1000  # no idx below it is ever published in this test, so 0 is always wrong
ROUNDS = 60000  # the idx never wraps: START + ROUNDS < 65536
SIZE = 8


def _observe(memory: GuestMemory, driver: FakeDriver, ready: int, report: int) -> None:
    """The observer's whole life: sample the device area until the last idx is published,
    then report [samples, first wrong values] as JSON."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory.mapping)) + driver.config.device_area
    used_idx = ctypes.c_uint16.from_address(base + 2)
    elements = (ctypes.c_uint32 * (2 * SIZE)).from_address(base + 4)
    avail_event = ctypes.c_uint16.from_address(base + 4 + 8 * SIZE)
    samples, wrong = 0, []
    os.write(ready, b"r")
    idx = START
    while idx != START + ROUNDS and len(wrong) < 5:
        # Mostly the idx alone, in a tight loop: a torn store lasts nanoseconds.
        for _ in range(1000):
            idx = used_idx.value
            if not START <= idx <= START + ROUNDS:
                wrong.append(f"used idx {idx}")
        samples += 1000
        if idx != START:
            # Entry idx - 1 was stored before idx: its len is idx - 1, or more if the
            # device has since reused the slot on a later lap, never less.
            length = elements[2 * ((idx - 1) % SIZE) + 1]
            if length < idx - 1:
                wrong.append(f"used idx {idx} with entry len {length}")
        event = avail_event.value
        if not START <= event <= START + ROUNDS:
            wrong.append(f"avail_event {event}")
    os.write(report, json.dumps([samples, wrong]).encode())


def test_a_driver_on_another_cpu_sees_only_published_values():
    memory = GuestMemory(4 * MiB)
    driver = FakeDriver(memory, SIZE, start_index=START, event_idx=True)
    queue = SplitQueue(memory, driver.config, event_idx=True, indirect=False,
                       last_available=START, next_used=START)
    ready_read, ready_write = os.pipe()
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _observe(memory, driver, ready_write, report_write)
        finally:
            os._exit(0)
    os.close(report_write)
    try:
        assert os.read(ready_read, 1) == b"r"
        for position in range(START, START + ROUNDS):
            driver.add_chain(writable=[4])
            driver.publish()
            chain = queue.pop()
            queue.add_used(chain.head, position)  # the len says which entry this is
            assert not queue.has_available()  # stores avail_event, with the ring empty
            driver.used()
        assert select.select([report_read], [], [], 30)[0], "the observer did not finish"
        samples, wrong = json.loads(os.read(report_read, 4096))
    finally:
        os.kill(pid, signal.SIGKILL)  # done, or waiting for an idx a failed loop never published
        os.waitpid(pid, 0)
        for fd in (ready_read, ready_write, report_read):
            os.close(fd)
    assert samples > ROUNDS  # it did watch while we served
    assert wrong == [], f"the observer saw {wrong} in {samples} samples"
    assert struct.unpack_from("<H", memory.view, driver.config.device_area + 2)[0] == START + ROUNDS
