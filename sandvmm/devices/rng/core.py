"""The entropy device core: fill every buffer the guest offers with bytes from a source."""

from __future__ import annotations

from typing import Callable

from sandvmm.devices.virtio.device import RING_FEATURES
from sandvmm.devices.virtio.queue import Chain, SplitQueue

VIRTIO_ID_ENTROPY = 4
REQUEST_QUEUE = 0
MAX_REQUEST = 64 * 1024  # per chain: a guest asking for more gets it in several requests


class RngCore:
    name = "rng"
    device_type = VIRTIO_ID_ENTROPY
    queue_max_sizes = (256,)
    features = RING_FEATURES

    def __init__(self, entropy: Callable[[int], bytes]):
        self.entropy = entropy
        self.queue: SplitQueue | None = None

    def config_read(self, offset: int, size: int) -> bytes:
        return bytes(size)  # no device configuration

    def config_write(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features: int, queues: dict[int, SplitQueue]) -> None:
        self.queue = queues.get(REQUEST_QUEUE)

    def reset(self) -> None:
        self.queue = None

    def _fill(self, chain: Chain) -> int:
        return chain.write(self.entropy(min(chain.writable_length, MAX_REQUEST)))

    def process(self, queue_index: int) -> list[int]:
        if queue_index != REQUEST_QUEUE or self.queue is None:
            return []
        return [REQUEST_QUEUE] if self.queue.serve(self._fill) else []
