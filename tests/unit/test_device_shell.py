"""The device shell's data path around a real core, without processes or KVM: how often it
calls the core and interrupts for one kick."""

from __future__ import annotations

import socket

import pytest

from sandvmm.devices.block.core import SLICE_BYTES
from sandvmm.devices.virtio.shell import DeviceShell
from sandvmm.memory import GuestMemory, MiB
from tests.unit.block_rig import T_IN, MemoryDisk, Rig


@pytest.fixture(scope="module")
def memory():
    return GuestMemory(16 * MiB)


class ShellRig(Rig):
    """A Rig whose queue is served by a DeviceShell, which records the core's calls and the
    interrupts it raises (what it asked the transport for, before any eventfd)."""

    def __init__(self, memory, **options):
        super().__init__(memory, MemoryDisk(4 * MiB), event_idx=True, **options)  # as Linux negotiates
        channels = [socket.socketpair() for _ in range(3)]
        self.peers = [peer for _, peer in channels]  # kept open: the shell's ends close with them
        self.shell = DeviceShell(self.core, memory, *(ours.detach() for ours, _ in channels))
        self.shell.queues = {0: self.queue}
        self.calls: list[int] = []  # chains available at each call of the core
        self.interrupts: list[list[int]] = []
        process = self.core.process

        def counting_process(index):
            self.calls.append((self.driver.available_idx - self.queue.last_available) & 0xFFFF)
            return process(index)
        self.core.process = counting_process
        self.shell.interrupt = self.interrupts.append

    def next_request_kicks(self) -> bool:
        """Whether the driver would kick for one more request (else the device never hears of it)."""
        self.submit(T_IN, 0, writable=[512, 1], publish=False)
        return self.driver.publish()


def test_a_drained_queue_is_not_served_twice_for_one_kick(memory):
    rig = ShellRig(memory, slice_bytes=None)
    heads = [rig.submit(T_IN, 0, writable=[4096, 1]) for _ in range(3)]
    rig.shell.process(0)
    assert rig.calls == [3] and rig.interrupts == [[0]]
    assert [head for head, _ in rig.driver.used()] == heads
    rig.shell.process(0)  # a kick with nothing new: one look, no interrupt
    assert rig.calls == [3, 0] and rig.interrupts == [[0]]
    assert rig.next_request_kicks()


def test_a_core_serving_in_slices_is_called_until_the_queue_is_empty(memory):
    rig = ShellRig(memory)
    heads = [rig.submit(T_IN, 0, writable=[SLICE_BYTES, 1]) for _ in range(3)]
    rig.shell.process(0)
    # One request a slice, an interrupt after each, so that the driver reaps them early.
    assert rig.calls == [3, 2, 1] and rig.interrupts == [[0], [0], [0]]
    assert [head for head, _ in rig.driver.used()] == heads
    # The last slice ended with the queue: finding it empty must still ask for a kick.
    assert rig.next_request_kicks()


def test_a_ring_broken_between_slices_asks_for_a_reset(memory, monkeypatch):
    rig = ShellRig(memory)
    for _ in range(2):
        rig.submit(T_IN, 0, writable=[SLICE_BYTES, 1])
    resets = []
    monkeypatch.setattr(rig.shell.transport, "needs_reset", lambda: resets.append(True))
    monkeypatch.setattr(rig.shell, "log", lambda message: None)
    original = rig.core.process

    def break_after_first(index):
        used = original(index)
        rig.driver.set_available_idx(rig.queue.last_available + rig.queue.size + 1)  # too far ahead
        return used
    rig.core.process = break_after_first
    rig.shell.process(0)
    assert resets == [True] and rig.shell.queues == {}
