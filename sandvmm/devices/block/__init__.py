"""virtio-blk (block device, virtio id 2): a disk image for the guest, served by a jailed child that holds only its fds."""
