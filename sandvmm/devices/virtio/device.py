"""Pieces every device core shares (pure, like the cores themselves)."""

from __future__ import annotations

from typing import Callable

from sandvmm.devices.virtio.queue import Chain, GuestError, SplitQueue

# Transport feature bits every device here supports, since the queue core implements both.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
RING_FEATURES = 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX


def drain(queue: SplitQueue, handle: Callable[[Chain], int], more: Callable[[], bool] = lambda: True) -> int:
    """Pop available chains while `more()` holds and complete each with the byte count
    `handle` wrote into it.

    A malformed chain is completed with 0 bytes and the queue goes on; a broken ring
    (GuestError without a head) propagates. Returns how many chains were completed.
    """
    completed = 0
    while more():
        try:
            chain = queue.pop()
        except GuestError as error:
            if error.head is None:
                raise
            queue.add_used(error.head, 0)
            completed += 1
            continue
        if chain is None:
            break
        queue.add_used(chain.head, handle(chain))
        completed += 1
    return completed
