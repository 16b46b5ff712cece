"""Pieces every device core shares (pure, like the cores themselves)."""

# Transport feature bits every device here supports, since the queue core implements both.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
RING_FEATURES = 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX
