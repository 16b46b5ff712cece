"""virtio-rng (entropy device, virtio id 4): the guest's /dev/hwrng, fed by the host's getrandom."""
