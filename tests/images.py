"""Guest images the kvm tests boot. The lab has no network, so the host builds them first."""

# Each entry is a `--with` list; [] is the default guest.
KVM_TEST_IMAGES = [[], ["hello"], ["pciutils"], ["e2fsprogs"]]
