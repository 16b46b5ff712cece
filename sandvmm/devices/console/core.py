"""The console device core: one console port, with the multiport control queues.

Output is whatever the guest puts in transmit buffers (and the emergency-write register);
input is bytes the host feeds, handed out as the guest offers receive buffers. Bytes the
guest has no buffer for yet stay queued here: nothing is dropped.

Why multiport for one port: without it the guest cannot say when its port is ready, and
Linux throws away input that arrives between filling the receive queue and setting up the
console port. With VIRTIO_CONSOLE_F_MULTIPORT the guest reports PORT_OPEN once the port
takes data, and input waits for that. A driver without multiport gets input at once.
"""

from __future__ import annotations

import struct
from typing import Callable

from sandvmm.devices.virtio.device import RING_FEATURES
from sandvmm.devices.virtio.queue import Chain, SplitQueue

VIRTIO_ID_CONSOLE = 3
# Queues of port 0, then the control queues (device → driver, driver → device).
RECEIVE_QUEUE, TRANSMIT_QUEUE, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE = 0, 1, 2, 3
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2
# struct virtio_console_config: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
MAX_PENDING_INPUT = 1 << 20
# struct virtio_console_control: port id u32, event u16, value u16.
CONTROL = struct.Struct("<IHH")
DEVICE_READY, DEVICE_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN = 0, 1, 3, 4, 6
CONSOLE_PORT_ID = 0
MAX_PENDING_CONTROL = 64  # a guest repeating DEVICE_READY must not grow our queue forever


class ConsoleCore:
    name = "console"
    device_type = VIRTIO_ID_CONSOLE
    queue_max_sizes = (256, 256, 64, 64)
    features = RING_FEATURES | 1 << VIRTIO_CONSOLE_F_MULTIPORT | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE

    def __init__(self, output: Callable[[bytes], None]):
        self.output = output
        self.pending_input = bytearray()
        self.pending_control: list[bytes] = []  # messages for the driver, waiting for buffers
        self.queues: dict[int, SplitQueue] = {}
        self.port_open = False  # the guest takes input on port 0

    def config_read(self, offset: int, size: int) -> bytes:
        config = CONFIG.pack(0, 0, 1, 0)
        return config[offset:offset + size].ljust(size, b"\0") if offset >= 0 else bytes(size)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and data:
            self.output(data[:1])  # the spec's emergency write: one character, no queue needed

    def activate(self, features: int, queues: dict[int, SplitQueue]) -> None:
        self.queues = queues
        self.pending_control = []
        self.port_open = not features & 1 << VIRTIO_CONSOLE_F_MULTIPORT

    def reset(self) -> None:
        self.queues = {}
        self.pending_control = []
        self.port_open = False

    def feed(self, data: bytes) -> bool:
        """Queue host input; False (and nothing queued) when the backlog is full."""
        if len(self.pending_input) + len(data) > MAX_PENDING_INPUT:
            return False
        self.pending_input += data
        return True

    def _transmit(self, chain: Chain) -> int:
        self.output(chain.read(chain.readable_length))
        return 0  # the device writes nothing into a transmit buffer

    def _receive(self, chain: Chain) -> int:
        written = chain.write(self.pending_input)
        del self.pending_input[:written]
        return written

    def _control_from_driver(self, chain: Chain) -> int:
        message = chain.read(CONTROL.size)
        if len(message) < CONTROL.size:
            return 0  # malformed: ignored, like any unknown message
        port, event, value = CONTROL.unpack(message)
        if event == DEVICE_READY and value == 1:
            self._tell_driver(CONSOLE_PORT_ID, DEVICE_ADD)
        elif event == PORT_READY and port == CONSOLE_PORT_ID and value == 1:
            self._tell_driver(port, CONSOLE_PORT)
            self._tell_driver(port, PORT_OPEN)  # the host side is always connected
        elif event == PORT_OPEN and port == CONSOLE_PORT_ID:
            self.port_open = value == 1
        return 0

    def _tell_driver(self, port: int, event: int, value: int = 1) -> None:
        if len(self.pending_control) < MAX_PENDING_CONTROL:
            self.pending_control.append(CONTROL.pack(port, event, value))

    def _control_to_driver(self, chain: Chain) -> int:
        message = self.pending_control[0]
        written = chain.write(message)
        if written == len(message):  # a buffer too small for a message gets nothing
            del self.pending_control[0]
            return written
        return 0

    def _drain(self, index: int) -> bool:
        queue = self.queues.get(index)
        if queue is None:
            return False
        if index == TRANSMIT_QUEUE:
            return bool(queue.serve(self._transmit))
        if index == RECEIVE_QUEUE:
            return bool(queue.serve(self._receive, more=lambda: self.port_open and bool(self.pending_input)))
        if index == CONTROL_TRANSMIT_QUEUE:
            return bool(queue.serve(self._control_from_driver))
        if index == CONTROL_RECEIVE_QUEUE:
            return bool(queue.serve(self._control_to_driver, more=lambda: bool(self.pending_control)))
        return False

    def process(self, queue_index: int) -> list[int]:
        used = [queue_index] if self._drain(queue_index) else []
        if queue_index == CONTROL_TRANSMIT_QUEUE:  # the driver's messages may have replies and open the port
            used += [index for index in (CONTROL_RECEIVE_QUEUE, RECEIVE_QUEUE) if self._drain(index)]
        return used
