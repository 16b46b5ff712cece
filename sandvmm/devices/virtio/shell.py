"""The thin trio loop every virtio device child runs around its sans-I/O cores.

It owns the I/O the cores must not do: the three channels to main, one kick eventfd per
queue (main has KVM signal it on the guest's notify writes), one irqfd per MSI-X vector plus
the INTx pair, and the device's own backend tasks. The transport core says what the guest
did; the device core says which queues got used buffers; this loop turns that into eventfd
writes and requests to main.

The kicks are waited for in threads of their own, one per queue in a blocking read, not by
trio: a trio wakeup costs about 6 µs of Python on the host, a fixed cost per kick that
was about a third of the child's Python per 1 MiB read in a 1-vCPU lab. Whatever touches
the cores holds `lock`: the kick threads, and trio's (config requests, backend tasks).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Awaitable, Callable, Protocol, Sequence

import trio

from sandvmm import protocol
from sandvmm.devices.virtio import transport as virtio_pci
from sandvmm.devices.virtio.queue import GuestError, SplitQueue
from sandvmm.memory import GuestMemory

MSI_WINDOW = 0xFEE00000


class DeviceCore(virtio_pci.VirtioDeviceModel, Protocol):
    """What a device adds to the transport's model: queue processing and its backend."""

    name: str

    def activate(self, features: int, queues: dict[int, SplitQueue]) -> None: ...

    def reset(self) -> None: ...

    def process(self, queue_index: int) -> Sequence[int]:
        """Handle the queue's available chains, or a slice of them; return the queues that
        got used entries. The shell interrupts for those, and calls again while the queue
        still has chains available."""


BackendTask = Callable[["DeviceShell"], Awaitable[None]]  # host-side work, e.g. reading input


def _eventfd(flags: int = os.EFD_NONBLOCK) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | flags)


class DeviceShell:
    def __init__(self, core: DeviceCore, memory: GuestMemory, config_fd: int, irq_fd: int, memory_fd: int,
                 backend_tasks: Sequence[BackendTask] = ()):
        self.core = core
        self.backend_tasks = backend_tasks
        self.memory = memory
        self.transport = virtio_pci.VirtioPciTransport(core)
        self.config, self.irq, self.memory_channel = (
            trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) for fd in (config_fd, irq_fd, memory_fd))
        queues = len(core.queue_max_sizes)
        # Blocking: each is read only by its queue's kick thread, which waits in the read.
        self.kicks = [_eventfd(0) for _ in range(queues)]
        self.vectors = [_eventfd() for _ in range(queues + 1)]
        self.intx, self.resample = _eventfd(), _eventfd()
        self.queues: dict[int, SplitQueue] = {}
        # Reentrant: a config write may itself process a queue.
        self.lock = threading.RLock()

    # --- the channels ----------------------------------------------------------------------
    async def _receive(self, sock):
        data, ancillary, flags, _ = await sock.recvmsg(protocol.MAX_MESSAGE)
        if not data:
            raise EOFError("main closed the channel")
        return protocol.from_msgpack(data)

    async def _send(self, sock, msg, fds: Sequence[int] = ()) -> None:
        data = protocol.to_msgpack(msg)
        if fds:
            await sock.sendmsg([data], [protocol.scm_rights(fds)])
        else:
            await sock.send(data)

    async def _call(self, sock, msg, fds: Sequence[int] = ()):
        await self._send(sock, msg, fds)
        reply = await self._receive(sock)
        if isinstance(reply, protocol.Reply) and not reply.ok:
            raise protocol.ProtocolError(reply.error)
        return reply

    async def run(self) -> None:
        # Main computed our BARs and header itself (DeviceProxy.describe): first our eventfds.
        await self._call(self.irq, protocol.RegisterIrqfds(len(self.vectors)),
                         self.vectors + [self.intx, self.resample])
        offsets = [self.transport.notify_offset(index) for index in range(len(self.kicks))]
        await self._call(self.memory_channel, protocol.RegisterIoevents(virtio_pci.BAR_INDEX, offsets, 2), self.kicks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_kick_threads)
            nursery.start_soon(self._watch_resample)
            for task in self.backend_tasks:
                nursery.start_soon(task, self)
            await self._serve_config()
            nursery.cancel_scope.cancel()

    async def _serve_config(self) -> None:
        while True:
            try:
                request = await self._receive(self.config)
            except EOFError:
                return  # main is going away
            with self.lock:
                reply = await self._answer(request)
            await self._send(self.config, reply)

    async def _answer(self, request):
        if isinstance(request, protocol.ConfigRead):
            return protocol.Data(self.transport.config_read(request.register, request.size))
        if isinstance(request, protocol.BarRead):
            return protocol.Data(self.transport.bar_read(request.bar, request.offset, request.size))
        if isinstance(request, protocol.ConfigWrite):
            await self._apply(self.transport.config_write(request.register, request.data))
            return self._header_state()
        if isinstance(request, protocol.BarWrite):
            await self._apply(self.transport.bar_write(request.bar, request.offset, request.data))
            return self._header_state()
        return protocol.Reply(ok=False, error=f"unexpected {type(request).__name__}")

    def _header_state(self) -> protocol.HeaderState:
        return protocol.HeaderState(self.transport.header(), [list(r) for r in self.transport.volatile_registers()])

    # --- what the transport asks for ---------------------------------------------------------
    async def _apply(self, effects) -> None:
        for effect in effects:
            if isinstance(effect, virtio_pci.MsiRouteChanged):
                # An entry being rewritten passes through states that are not MSI messages yet.
                if effect.address & 0xFFF00000 == MSI_WINDOW:
                    await self._call(self.irq, protocol.SetMsiRoute(effect.vector, effect.address, effect.data))
            elif isinstance(effect, virtio_pci.FirePending):
                os.eventfd_write(self.vectors[effect.vector], 1)
            elif isinstance(effect, virtio_pci.FireIntx):
                os.eventfd_write(self.intx, 1)
            elif isinstance(effect, virtio_pci.Activated):
                self._activate(effect)
            elif isinstance(effect, virtio_pci.Reset):
                self.queues = {}
                self.core.reset()
            elif isinstance(effect, virtio_pci.QueueNotified):
                self.process(effect.index)

    def _activate(self, effect) -> None:
        event_idx = bool(effect.features & (1 << virtio_pci.VIRTIO_F_RING_EVENT_IDX))
        indirect = bool(effect.features & (1 << virtio_pci.VIRTIO_F_INDIRECT_DESC))
        try:
            self.queues = {index: SplitQueue(self.memory, config, event_idx=event_idx, indirect=indirect)
                           for index, config in effect.queues.items()}
        except GuestError as error:
            self.log(f"the driver set up a bad queue: {error}")
            self.deliver(self.transport.needs_reset())
            return
        self.core.activate(effect.features, self.queues)
        for index in self.queues:
            self.process(index)  # buffers made available before DRIVER_OK

    # --- the data path -------------------------------------------------------------------------
    async def _run_kick_threads(self) -> None:
        """Start one kick thread per queue, and end the child with the first error one has.

        Started here, after the jail, they have the jail's filter and no capabilities.
        Plain threads, not trio's: trio names its threads, a prctl the policies refuse. At
        the end they are left asleep in their reads, and die with the process."""
        failed = trio.Event()
        errors: list[BaseException] = []
        trio_token = trio.lowlevel.current_trio_token()

        def run(index: int) -> None:
            try:
                self._serve_kicks(index)
            except BaseException as error:
                errors.append(error)
                trio_token.run_sync_soon(failed.set)
        for index in range(len(self.kicks)):
            threading.Thread(target=run, args=(index,), name=f"sandvmm-{self.core.name}-kicks-{index}",
                             daemon=True).start()
        await failed.wait()
        raise errors[0]

    def _serve_kicks(self, index: int) -> None:
        """A kick thread: wait for queue `index`'s kick, then serve it. The read is the wait,
        one system call a kick (an epoll over every queue's eventfd and then a read took
        5.5 against 4.4 µs for a kick and its reply, on one host CPU)."""
        while True:
            os.eventfd_read(self.kicks[index])
            self.process(index)

    async def _watch_resample(self) -> None:
        # KVM lowered the INTx line at the guest's EOI; raise it again while the ISR says so.
        while True:
            await trio.lowlevel.wait_readable(self.resample)
            try:
                os.eventfd_read(self.resample)
            except BlockingIOError:
                continue
            with self.lock:
                if self.transport.intx_asserted:
                    os.eventfd_write(self.intx, 1)

    def process(self, index: int) -> None:
        """Let the core handle queue `index`, interrupting for every queue it used after
        each slice of work."""
        with self.lock:
            self._process(index)

    def _process(self, index: int) -> None:
        queue = self.queues.get(index)
        if queue is None:
            return
        try:
            # Again only while chains are left (a core that serves in slices stopped
            # early): a core that drained the queue asked for a kick on the next chain.
            while used := self.core.process(index):
                self.interrupt(used)
                if not queue.has_available():
                    return
        except GuestError as error:
            self.log(f"guest error on queue {index}: {error}; the device needs a reset")
            self.queues = {}
            self.deliver(self.transport.needs_reset())

    def interrupt(self, used: Sequence[int]) -> None:
        for queue_index in used:
            queue = self.queues.get(queue_index)
            if queue is not None and queue.needs_interrupt():
                self.deliver(self.transport.queue_interrupt(queue_index))

    def deliver(self, delivery) -> None:
        if isinstance(delivery, virtio_pci.MsiVector):
            os.eventfd_write(self.vectors[delivery.vector], 1)
        elif isinstance(delivery, virtio_pci.Intx):
            os.eventfd_write(self.intx, 1)

    def log(self, message: str) -> None:
        print(f"sandvmm: device {self.core.name}: {message}", file=sys.stderr, flush=True)


def serve(core: DeviceCore, memory: GuestMemory, channel_fds: Sequence[int],
          backend_tasks: Sequence[BackendTask] = ()) -> int:
    """A device child's whole life: returns its exit status."""
    async def main() -> None:
        await DeviceShell(core, memory, *channel_fds, backend_tasks=backend_tasks).run()
    try:
        trio.run(main)
    except (EOFError, protocol.ProtocolError, OSError) as error:
        print(f"sandvmm: device {core.name}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0
