"""PCI configuration mechanism #1 as Linux's pci_check_type1/pci_sanity_check use it."""

import struct

from sandvmm.main.pci import CLASS_HOST_BRIDGE, PciRoot


def config_read(root: PciRoot, bus: int, slot: int, function: int, register: int, size: int = 4) -> int:
    root.write(0, struct.pack("<I", 0x80000000 | bus << 16 | slot << 11 | function << 8 | (register & 0xFC)))
    return int.from_bytes(root.read(4 + (register & 3), size), "little")


def test_address_register_reads_back_as_linux_checks():
    root = PciRoot()
    root.write(0, struct.pack("<I", 0x80000000))
    assert root.read(0, 4) == struct.pack("<I", 0x80000000)


def test_host_bridge_at_00_00_0():
    root = PciRoot()
    assert config_read(root, 0, 0, 0, 0x00) == 0x00081B36
    assert config_read(root, 0, 0, 0, 0x08) >> 8 == CLASS_HOST_BRIDGE
    assert config_read(root, 0, 0, 0, 0x0A, size=2) == 0x0600


def test_empty_slots_and_disabled_access_read_all_ones():
    root = PciRoot()
    assert config_read(root, 0, 3, 0, 0) == 0xFFFFFFFF
    root.write(0, struct.pack("<I", 0))  # enable bit clear
    assert root.read(4, 4) == b"\xff" * 4


def test_read_only_registers_ignore_writes():
    root = PciRoot()
    root.write(0, struct.pack("<I", 0x80000000))
    root.write(4, b"\xff\xff\xff\xff")  # vendor/device
    assert config_read(root, 0, 0, 0, 0) == 0x00081B36
    root.write(0, struct.pack("<I", 0x80000004))
    root.write(4, b"\x07\x00")
    assert config_read(root, 0, 0, 0, 0x04, size=2) == 0x0007
