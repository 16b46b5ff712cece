"""virtio-console (virtio id 3): the guest's /dev/hvc0, written to a host sink and fed from host input."""
