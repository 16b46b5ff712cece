"""A guest that drives the virtio-pci transport core the way Linux's virtio_pci_modern
driver does, for the transport's tests."""

import struct

from sandvmm.devices.virtio import transport as vp

VERSION_1 = 1 << 32
OFFERED = 1 << 0 | 1 << 28 | 1 << 29 | VERSION_1  # VIRTIO_CONSOLE_F_SIZE, INDIRECT_DESC, EVENT_IDX
MAX_SIZES = (256, 128)  # two queues: MSI-X vectors 0 (config), 1 and 2 as Linux assigns them
RINGS = [(0x10000, 0x11000, 0x12000), (0x20000, 0x20800, 0x21000)]
MSI_ADDRESS = 0xFEE00000


class FakeConsole:
    """A device model with a 12-byte configuration space (virtio_console_config)."""

    device_type = 3
    queue_max_sizes = MAX_SIZES
    features = OFFERED & ~VERSION_1

    def __init__(self):
        self.config = bytearray(struct.pack("<HHII", 80, 25, 1, 0x12345678))
        self.writes = []

    def config_read(self, offset, size):
        return bytes(self.config[offset:offset + size])  # short past the end: the transport pads

    def config_write(self, offset, data):
        self.writes.append((offset, data))


class Guest:
    """Config-space and BAR0 accesses with integer values, as a driver's accessors make them."""

    def __init__(self, transport):
        self.t = transport

    def cfg(self, register, size=4):
        return int.from_bytes(self.t.config_read(register, size), "little")

    def set_cfg(self, register, value, size=4):
        return self.t.config_write(register, value.to_bytes(size, "little"))

    def read(self, offset, size=4):
        return int.from_bytes(self.t.bar_read(0, offset, size), "little")

    def write(self, offset, value, size=4):
        return self.t.bar_write(0, offset, value.to_bytes(size, "little"))

    def add_status(self, bits):  # virtio_add_status: read, OR, write back
        return self.write(vp.DEVICE_STATUS, self.read(vp.DEVICE_STATUS, 1) | bits, 1)

    def command(self, set_bits=0, clear_bits=0):
        return self.set_cfg(vp.COMMAND, self.cfg(vp.COMMAND, 2) & ~clear_bits | set_bits, 2)

    def capabilities(self):
        """Walk the list as pci_find_capability does: {capability id or ("virtio", cfg_type): position}."""
        found, position = {}, self.cfg(vp.CAPABILITIES_POINTER, 1) & ~3
        while position:
            cap_id = self.cfg(position, 1)
            key = ("virtio", self.cfg(position + 3, 1)) if cap_id == vp.PCI_CAP_ID_VENDOR else cap_id
            found.setdefault(key, position)  # the driver uses the first of each type
            position = self.cfg(position + 1, 1) & ~3
        return found

    def virtio_cap(self, cfg_type):
        position = self.capabilities()[("virtio", cfg_type)]
        return position, self.cfg(position + 4, 1), self.cfg(position + 8), self.cfg(position + 12)

    def msix_control(self):
        return self.capabilities()[vp.PCI_CAP_ID_MSIX] + 2


def new(device=None, decoding=True):
    transport = vp.VirtioPciTransport(device or FakeConsole())
    guest = Guest(transport)
    if decoding:  # as pci_enable_device leaves it
        assert guest.set_cfg(vp.COMMAND, vp.COMMAND_MEMORY, 2) == []
    return transport, guest


def linux_probe(guest, msix=True, features=OFFERED, queue_sizes=(256, 64)):
    """virtio_pci_probe + virtio_dev_probe + vp_modern_find_vqs; returns every effect, in order."""
    effects = guest.command(set_bits=vp.COMMAND_MEMORY)  # pci_enable_device
    effects += guest.command(set_bits=vp.COMMAND_BUS_MASTER)  # pci_set_master
    effects += guest.write(vp.DEVICE_STATUS, 0, 1)  # vp_reset, then wait for 0
    assert guest.read(vp.DEVICE_STATUS, 1) == 0
    effects += guest.add_status(vp.ACKNOWLEDGE) + guest.add_status(vp.DRIVER)
    guest.write(vp.DEVICE_FEATURE_SELECT, 0)
    offered = guest.read(vp.DEVICE_FEATURE)
    guest.write(vp.DEVICE_FEATURE_SELECT, 1)
    assert offered | guest.read(vp.DEVICE_FEATURE) << 32 == OFFERED
    for select in (0, 1):
        effects += guest.write(vp.DRIVER_FEATURE_SELECT, select)
        effects += guest.write(vp.DRIVER_FEATURE, features >> 32 * select & 0xFFFFFFFF)
    effects += guest.add_status(vp.FEATURES_OK)
    if not guest.read(vp.DEVICE_STATUS, 1) & vp.FEATURES_OK:
        return effects + guest.add_status(vp.FAILED)  # "virtio: device refuses features"
    if msix:
        effects += msix_capability_init(guest)
        assert guest.write(vp.CONFIG_MSIX_VECTOR, 0, 2) == [] and guest.read(vp.CONFIG_MSIX_VECTOR, 2) == 0
    assert guest.read(vp.NUM_QUEUES, 2) == len(MAX_SIZES)
    for index, size in enumerate(queue_sizes):  # setup_vq
        guest.write(vp.QUEUE_SELECT, index, 2)
        assert (guest.read(vp.QUEUE_SIZE, 2), guest.read(vp.QUEUE_ENABLE, 2)) == (MAX_SIZES[index], 0)
        effects += guest.write(vp.QUEUE_SIZE, size, 2)
        for field, address in zip((vp.QUEUE_DESC, vp.QUEUE_DRIVER, vp.QUEUE_DEVICE), RINGS[index]):
            effects += guest.write(field, address & 0xFFFFFFFF)  # vp_iowrite64_twopart
            effects += guest.write(field + 4, address >> 32)
        if msix:
            effects += guest.write(vp.QUEUE_MSIX_VECTOR, index + 1, 2)
            assert guest.read(vp.QUEUE_MSIX_VECTOR, 2) == index + 1
        assert guest.read(vp.QUEUE_NOTIFY_OFF, 2) == index
    for index in range(len(queue_sizes)):  # "select and activate all queues", last
        guest.write(vp.QUEUE_SELECT, index, 2)
        effects += guest.write(vp.QUEUE_ENABLE, 1, 2)
    return effects + guest.add_status(vp.DRIVER_OK)


def msix_capability_init(guest):
    """What drivers/pci/msi does: enable with all masked, program entries, unmask."""
    control = guest.msix_control()
    effects = guest.set_cfg(control, vp.MSIX_ENABLE | vp.MSIX_FUNCTION_MASK, 2)
    vectors = (guest.cfg(control, 2) & 0x7FF) + 1
    for entry in range(vp.MSIX_TABLE_OFFSET, vp.MSIX_TABLE_OFFSET + 16 * vectors, 16):
        effects += guest.write(entry, MSI_ADDRESS) + guest.write(entry + 4, 0)
        effects += guest.write(entry + 8, 0x40 + (entry - vp.MSIX_TABLE_OFFSET) // 16)
    effects += guest.command(set_bits=vp.COMMAND_INTX_DISABLE)
    effects += guest.set_cfg(control, vp.MSIX_ENABLE, 2)
    for entry in range(vp.MSIX_TABLE_OFFSET, vp.MSIX_TABLE_OFFSET + 16 * vectors, 16):
        effects += guest.write(entry + 12, 0)  # request_irq unmasks each vector
    return effects


def expected_activation(features=OFFERED, sizes=(256, 64)):
    return vp.Activated(features, {index: vp.QueueConfig(size, *RINGS[index]) for index, size in enumerate(sizes)})


def probed(msix=True):
    transport, guest = new()
    linux_probe(guest, msix=msix)
    return transport, guest


# --- discovery ----------------------------------------------------------------------------------
