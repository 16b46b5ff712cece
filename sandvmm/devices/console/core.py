"""The console device core: one port (no MULTIPORT), receiveq 0 and transmitq 1.

Output is whatever the guest puts in transmit buffers (and the emergency-write register);
input is bytes the host feeds, handed out as the guest offers receive buffers. Bytes the
guest has no buffer for yet stay queued here: nothing is dropped.
"""

from __future__ import annotations

import struct
from typing import Callable

from sandvmm.devices.virtio.device import RING_FEATURES, drain
from sandvmm.devices.virtio.queue import Chain, SplitQueue

VIRTIO_ID_CONSOLE = 3
RECEIVE_QUEUE, TRANSMIT_QUEUE = 0, 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2
# struct virtio_console_config: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
MAX_PENDING_INPUT = 1 << 20


class ConsoleCore:
    name = "console"
    device_type = VIRTIO_ID_CONSOLE
    queue_max_sizes = (256, 256)
    features = RING_FEATURES | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE

    def __init__(self, output: Callable[[bytes], None]):
        self.output = output
        self.pending_input = bytearray()
        self.queues: dict[int, SplitQueue] = {}

    def config_read(self, offset: int, size: int) -> bytes:
        config = CONFIG.pack(0, 0, 1, 0)
        return config[offset:offset + size].ljust(size, b"\0") if offset >= 0 else bytes(size)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and data:
            self.output(data[:1])  # the spec's emergency write: one character, no queue needed

    def activate(self, features: int, queues: dict[int, SplitQueue]) -> None:
        self.queues = queues

    def reset(self) -> None:
        self.queues = {}

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

    def process(self, queue_index: int) -> list[int]:
        queue = self.queues.get(queue_index)
        if queue is None:
            return []
        if queue_index == TRANSMIT_QUEUE:
            used = drain(queue, self._transmit)
        elif queue_index == RECEIVE_QUEUE:
            used = drain(queue, self._receive, more=lambda: bool(self.pending_input))
        else:
            used = 0
        return [queue_index] if used else []
