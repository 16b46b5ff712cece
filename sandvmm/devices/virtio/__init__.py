"""Virtio device-side building blocks shared by every device: the split virtqueue (sans-I/O).

`driver.FakeDriver` is the guest side of a queue, for tests, fuzzers and benchmarks; it is
not imported here so that device children do not load it.
"""

from sandvmm.devices.virtio.queue import Chain, GuestError, QueueConfig, SplitQueue

__all__ = ["Chain", "GuestError", "QueueConfig", "SplitQueue"]
