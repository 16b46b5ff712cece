"""Main's side of one device child: a PCI function whose registers live in another process.

The proxy sits on the PCI root like any function. Configuration-space and BAR accesses
(setup-time traffic: the data path never comes here) become requests on the child's config
channel. Configuration-space reads, most of the guest's PCI scan, are answered from a mirror
of the header: computed by main from the device's pure transport at launch (`describe`),
then as the child sends it after each write, with the registers main must still ask for
(volatile ones) as they stand then. BAR writes are posted, as PCI posts
memory writes: the vCPU goes on without waiting, and their answers are read before the next
request (the channel keeps order, so a read still sees every earlier write done).

The child's own requests arrive on its irq and memory channels and are served by the
supervisor thread through `serve_irq` / `serve_memory`; each channel can only ask for what
its privilege allows (routes for the child's own vectors; ioeventfds inside its own BARs).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field

from sandvmm import protocol
from sandvmm.devices.virtio import transport as virtio_pci
from sandvmm.main import kvm
from sandvmm.main.interrupts import IrqRouting, RouteError
from sandvmm.main.pci import BarSpec


MAX_POSTED_WRITES = 32  # answers left unread at most: neither side's send may block on a full socket


class DeviceGone(Exception):
    """The child stopped answering (it died or closed its channel)."""


@dataclass
class Channels:
    """The three socketpairs of one device; each end is a SOCK_SEQPACKET socket."""
    config: socket.socket
    irq: socket.socket
    memory: socket.socket

    @staticmethod
    def pairs() -> tuple["Channels", "Channels"]:
        ends = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
        return Channels(*(pair[0] for pair in ends)), Channels(*(pair[1] for pair in ends))

    def fds(self) -> list[int]:
        return [self.config.fileno(), self.irq.fileno(), self.memory.fileno()]

    def close(self) -> None:
        for sock in (self.config, self.irq, self.memory):
            sock.close()


@dataclass
class Ioevents:
    bar: int
    length: int
    offsets: list[int]
    fds: list[int]
    base: int | None = None  # where they are registered now


@dataclass
class DeviceProxy:
    name: str
    vm: kvm.Vm
    routing: IrqRouting
    channels: Channels
    intx_gsi: int
    bars: list[BarSpec] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the config channel
    # Not the channel's lock: a vCPU waiting on the channel for a starting child must not
    # keep the supervisor from taking that child's ioevent registration.
    ioevent_lock: threading.Lock = field(default_factory=threading.Lock)
    bar_bases: dict[int, int | None] = field(default_factory=dict)  # where the guest mapped each BAR
    started: threading.Event = field(default_factory=threading.Event)
    vector_gsis: list[int] = field(default_factory=list)
    vector_fds: list[int] = field(default_factory=list)
    routed: set[int] = field(default_factory=set)
    ioevents: list[Ioevents] = field(default_factory=list)
    owned_fds: list[int] = field(default_factory=list)
    header: bytes = b""  # the child's configuration header, as of its last write
    volatile: list[tuple[int, int]] = field(default_factory=list)  # (register, length) to ask for
    posted: int = 0  # BAR writes sent whose answers have not been read yet
    on_gone: object = None  # callable(name) -> None, set by the machine

    def describe(self, transport) -> None:
        """What the child will show before any write, computed here from the same pure
        transport code the child runs: the PCI root can place the BARs and the guest can
        read the header while the child is still starting."""
        self.bars = [BarSpec(virtio_pci.BAR_INDEX, virtio_pci.BAR_SIZE, is_64bit=True, prefetchable=False)]
        self._mirror(transport.header(), transport.volatile_registers())

    # --- requests from the child ---------------------------------------------------------
    def serve_irq(self) -> None:
        """Answer one request on the irq channel."""
        msg, fds = protocol.receive(self.channels.irq)
        try:
            self._irq_request(msg, fds)
            reply = protocol.Reply(ok=True)
        except (RouteError, kvm.KvmError, ValueError) as error:
            reply = protocol.Reply(ok=False, error=str(error))
        protocol.send(self.channels.irq, reply)

    def _irq_request(self, msg, fds: list[int]) -> None:
        self.owned_fds += fds
        if isinstance(msg, protocol.RegisterIrqfds):
            if self.vector_fds or len(fds) != msg.vectors + 2 or not 0 < msg.vectors <= 2048:
                raise ValueError("bad interrupt registration")
            self.vector_fds, (intx, resample) = fds[:-2], fds[-2:]
            self.vector_gsis = self.routing.allocate(msg.vectors)
            self.vm.irqfd(intx, self.intx_gsi, resample_fd=resample)
        elif isinstance(msg, protocol.SetMsiRoute):
            if not 0 <= msg.vector < len(self.vector_gsis) or fds:
                raise ValueError(f"no vector {msg.vector}")
            gsi = self.vector_gsis[msg.vector]
            self.routing.set_msi(gsi, msg.address, msg.data)
            if gsi not in self.routed:  # irqfd only once a route exists: no stray injections
                self.vm.irqfd(self.vector_fds[msg.vector], gsi)
                self.routed.add(gsi)
        else:
            raise ValueError(f"{type(msg).__name__} is not an irq-channel request")

    def serve_memory(self) -> None:
        msg, fds = protocol.receive(self.channels.memory)
        self.owned_fds += fds
        ok, error = True, ""
        sizes = {spec.index: spec.size for spec in self.bars}
        if (isinstance(msg, protocol.RegisterIoevents) and len(fds) == len(msg.offsets)
                and msg.length in (1, 2, 4, 8) and msg.bar in sizes
                and all(isinstance(o, int) and 0 <= o <= sizes[msg.bar] - msg.length for o in msg.offsets)):
            group = Ioevents(msg.bar, msg.length, list(msg.offsets), fds)
            with self.ioevent_lock:
                self.ioevents.append(group)
                self._place(group, self.bar_bases.get(msg.bar))  # the guest may have mapped it already
        else:
            ok, error = False, f"bad memory-channel request {type(msg).__name__}"
        protocol.send(self.channels.memory, protocol.Reply(ok=ok, error=error))
        self.started.set()  # the child's last startup request: it serves its config channel next

    # --- PciFunction ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _channel(self):
        """The config channel, held; a child found gone is reported and raises DeviceGone."""
        with self.lock:
            try:
                yield self.channels.config
            except (OSError, EOFError, protocol.ProtocolError) as error:
                if callable(self.on_gone):
                    self.on_gone(self.name, str(error))
                raise DeviceGone(str(error)) from None

    def _settle(self, channel) -> None:
        """Read the answers to posted writes (channel held): the mirror then reflects them."""
        while self.posted:
            reply, fds = protocol.receive(channel)
            for fd in fds:
                os.close(fd)
            self.posted -= 1
            self._refresh(reply)

    def _call(self, msg):
        with self._channel() as channel:
            self._settle(channel)
            return protocol.call(channel, msg)

    def _post(self, msg) -> None:
        try:
            with self._channel() as channel:
                if self.posted >= MAX_POSTED_WRITES:
                    self._settle(channel)
                protocol.send(channel, msg)
                self.posted += 1
        except DeviceGone:
            pass

    def _read(self, msg, size: int) -> bytes:
        try:
            reply = self._call(msg)
        except DeviceGone:
            return b"\xff" * size
        data = reply.data if isinstance(reply, protocol.Data) else b""
        return data[:size].ljust(size, b"\xff")

    def _refresh(self, reply) -> None:
        """A write's answer: the header as it now stands, and what is volatile now."""
        if isinstance(reply, protocol.HeaderState) and len(reply.header) == len(self.header):
            self._mirror(reply.header, reply.volatile)

    def _mirror(self, header: bytes, volatile) -> None:
        self.header = bytes(header)
        self.volatile = [(register, length) for register, length in volatile]

    def config_read(self, register: int, size: int) -> bytes:
        if self.posted:  # a posted write may have changed the header or what is volatile
            with contextlib.suppress(DeviceGone), self._channel() as channel:
                self._settle(channel)
        end = register + size
        if end <= len(self.header) and not any(start < end and register < start + length
                                               for start, length in self.volatile):
            return self.header[register:end]
        return self._read(protocol.ConfigRead(register, size), size)

    def config_write(self, register: int, data: bytes) -> None:
        with contextlib.suppress(DeviceGone):
            self._refresh(self._call(protocol.ConfigWrite(register, bytes(data))))

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return self._read(protocol.BarRead(index, offset, size), size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self._post(protocol.BarWrite(index, offset, bytes(data)))

    def bar_mapped(self, index: int, base: int | None) -> None:
        """Move this BAR's ioeventfds with it, so queue kicks keep bypassing main."""
        with self.ioevent_lock:
            self.bar_bases[index] = base
            for group in self.ioevents:
                if group.bar == index:
                    self._place(group, base)

    def _place(self, group: Ioevents, base: int | None) -> None:
        for offset, fd in zip(group.offsets, group.fds):
            if group.base is not None:
                self.vm.ioeventfd(fd, group.base + offset, group.length, deassign=True)
            if base is not None:
                self.vm.ioeventfd(fd, base + offset, group.length)
        group.base = base

    def close(self) -> None:
        self.channels.close()
        for fd in self.owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned_fds = []
