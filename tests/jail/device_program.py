"""A representative device child: a trio loop on a control socket and eventfds.

It does what every sandvmm device child does: wait on a kick eventfd and on a control
socket with trio.lowlevel.wait_readable, raise an "interrupt" by writing an eventfd,
exchange messages carrying fds (SCM_RIGHTS), and map a memfd it was sent (guest RAM)
MAP_SHARED to write into it. tests/jail/test_policies.py runs it
under policies/x86_64/common_device.policy; trace_device_syscalls.py lists what it calls.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
from dataclasses import dataclass

import trio

KICK_VALUE = 7
RAM_SIZE = 1 << 20  # big enough that buffers of this size come from mmap(2)


@dataclass
class DeviceFds:
    """The parent's and the child's ends of one device's channels."""

    control_parent: socket.socket
    control_child: socket.socket
    kick: int   # parent writes, child waits (like an ioeventfd)
    irq: int    # child writes, parent waits (like an irqfd)

    @classmethod
    def create(cls) -> DeviceFds:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(parent, child, os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC))

    def child_fds(self) -> tuple[int, ...]:
        return (self.control_child.fileno(), self.kick, self.irq)

    def close(self) -> None:
        for s in (self.control_parent, self.control_child):
            s.close()
        for fd in (self.kick, self.irq):
            os.close(fd)


def device_main(fds: DeviceFds) -> int:
    """The child's target: returns 0 when both channels behaved as expected."""
    return trio.run(_device_loop, fds.control_child.fileno(), fds.kick, fds.irq)


async def _device_loop(control_fd: int, kick: int, irq: int) -> int:
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    os.set_blocking(kick, False)

    async def queue_worker() -> None:
        await trio.lowlevel.wait_readable(kick)
        os.eventfd_write(irq, os.eventfd_read(kick) + 1)

    async def control_worker() -> None:
        await trio.lowlevel.wait_readable(control)
        message, fds, _, _ = socket.recv_fds(control, RAM_SIZE, 4)
        with mmap.mmap(fds[0], RAM_SIZE) as ram:  # MAP_SHARED, PROT_READ|PROT_WRITE
            ram[:len(message)] = message.upper()
        await trio.sleep(0.001)  # the timer path: clock reads, epoll_wait with a timeout
        socket.send_fds(control, [message.upper()], fds)
        for fd in fds:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue_worker)
        nursery.start_soon(control_worker)
    return 0


def drive_device(fds: DeviceFds, timeout: float = 10.0) -> None:
    """The parent's side: kick, expect the interrupt, then a round trip with an fd."""
    os.eventfd_write(fds.kick, KICK_VALUE)
    os.set_blocking(fds.irq, True)
    if not _readable(fds.irq, timeout):
        raise AssertionError("the device raised no interrupt")
    assert os.eventfd_read(fds.irq) == KICK_VALUE + 1
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(ram, RAM_SIZE)
        socket.send_fds(fds.control_parent, [b"ping"], [ram])
        if not _readable(fds.control_parent.fileno(), timeout):
            raise AssertionError("the device did not answer on the control socket")
        reply, returned, _, _ = socket.recv_fds(fds.control_parent, 1024, 4)
        assert reply == b"PING" and len(returned) == 1
        # The same file came back, and the child wrote into it through its mapping.
        assert os.path.sameopenfile(returned[0], ram)
        os.close(returned[0])
        assert os.pread(ram, 4, 0) == b"PING"
    finally:
        os.close(ram)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])
