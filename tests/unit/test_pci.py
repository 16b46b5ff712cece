"""The PCI root: configuration space through ECAM, BARs and their windows."""


import pytest

from sandvmm.main.pci import CLASS_HOST_BRIDGE, BarSpec, Ecam, PciRoot


def config_read(root: PciRoot, slot: int, register: int, size: int = 4) -> int:
    return int.from_bytes(root.ecam.read(slot << 15 | register, size), "little")


def test_host_bridge_at_00_00_0():
    root = PciRoot()
    assert config_read(root, 0, 0x00) == 0x00081B36
    assert config_read(root, 0, 0x08) >> 8 == CLASS_HOST_BRIDGE
    assert config_read(root, 0, 0x0A, size=2) == 0x0600


def test_empty_slots_and_other_functions_read_all_ones():
    root = PciRoot()
    assert config_read(root, 3, 0) == 0xFFFFFFFF
    assert int.from_bytes(root.ecam.read(0 << 15 | 1 << 12, 4), "little") == 0xFFFFFFFF  # 00:00.1


def test_read_only_registers_ignore_writes():
    root = PciRoot()
    root.ecam.write(0, b"\xff\xff\xff\xff")  # vendor/device
    assert config_read(root, 0, 0) == 0x00081B36
    root.ecam.write(0x04, b"\x07\x00")
    assert config_read(root, 0, 0x04, size=2) == 0x0007


# --- BARs, ECAM and the windows -----------------------------------------------------------

WINDOW32 = (0xC0000000, 0x20000000)
WINDOW64 = (0x1_0000_0000, 0x10_0000_0000)


class FakeFunction:
    """A function with one 64-bit BAR that records what reaches it."""

    def __init__(self, bars=(BarSpec(0, 0x10000),)):
        self.bars = list(bars)
        self.config = bytearray(4096)
        self.config[0:4] = b"\xf4\x1a\x44\x10"
        self.accesses = []
        self.mappings = []

    def config_read(self, register, size):
        return bytes(self.config[register:register + size])

    def config_write(self, register, data):
        self.config[register:register + len(data)] = data

    def bar_read(self, index, offset, size):
        self.accesses.append(("read", index, offset, size))
        return bytes([index + 1]) * size

    def bar_write(self, index, offset, data):
        self.accesses.append(("write", index, offset, bytes(data)))

    def bar_mapped(self, index, base):
        self.mappings.append((index, base))


def ecam_read(root, slot, register, size=4):
    return int.from_bytes(root.ecam.read(slot << 15 | register, size), "little")


def ecam_write(root, slot, register, value, size=4):
    root.ecam.write(slot << 15 | register, value.to_bytes(size, "little"))


def test_bars_are_allocated_naturally_aligned_in_their_windows():
    root = PciRoot(WINDOW32, WINDOW64)
    first, second = FakeFunction(), FakeFunction([BarSpec(0, 0x1000, is_64bit=False), BarSpec(2, 0x40000)])
    root.add(first, 1), root.add(second, 2)
    assert root.bar_address(1, 0) == WINDOW64[0]
    assert root.bar_address(2, 2) == WINDOW64[0] + 0x40000  # aligned to its own size
    assert root.bar_address(2, 0) == WINDOW32[0]
    assert ecam_read(root, 1, 0x10) == WINDOW64[0] & 0xFFFFFFFF | 0x4  # 64-bit memory BAR
    assert ecam_read(root, 1, 0x14) == WINDOW64[0] >> 32


def test_bar_sizing_reads_back_the_size_mask_then_the_address_is_restored():
    root = PciRoot(WINDOW32, WINDOW64)
    root.add(FakeFunction(), 1)
    original = ecam_read(root, 1, 0x10), ecam_read(root, 1, 0x14)
    ecam_write(root, 1, 0x10, 0xFFFFFFFF)
    ecam_write(root, 1, 0x14, 0xFFFFFFFF)
    size_mask = ecam_read(root, 1, 0x14) << 32 | ecam_read(root, 1, 0x10) & ~0xF
    assert (~size_mask & 0xFFFFFFFFFFFFFFFF) + 1 == 0x10000
    ecam_write(root, 1, 0x10, original[0])
    ecam_write(root, 1, 0x14, original[1])
    assert (ecam_read(root, 1, 0x10), ecam_read(root, 1, 0x14)) == original


def test_a_bar_decodes_only_while_memory_space_is_enabled_and_follows_moves():
    root = PciRoot(WINDOW32, WINDOW64)
    function = FakeFunction()
    root.add(function, 1)
    window = root.bar_window(WINDOW64[0])
    assert window.read(0x10, 4) == b"\xff" * 4 and function.accesses == []
    ecam_write(root, 1, 0x04, 0x2, size=2)  # memory space on
    assert function.mappings == [(0, WINDOW64[0])]
    assert window.read(0x10, 4) == b"\x01" * 4
    window.write(0x3004, b"\x02\x00")
    assert function.accesses[-1] == ("write", 0, 0x3004, b"\x02\x00")
    ecam_write(root, 1, 0x10, (WINDOW64[0] + 0x100000) & 0xFFFFFFFF | 0x4)  # the guest moves it
    assert function.mappings[-1] == (0, WINDOW64[0] + 0x100000)
    assert window.read(0x10, 4) == b"\xff" * 4
    assert window.read(0x100010, 4) == b"\x01" * 4
    ecam_write(root, 1, 0x04, 0x0, size=2)
    assert function.mappings[-1] == (0, None)


def test_ecam_reaches_the_function_and_its_extended_space():
    root = PciRoot(WINDOW32, WINDOW64)
    function = FakeFunction()
    function.config[0x100:0x104] = b"\x11\x22\x33\x44"
    root.add(function, 3)
    assert ecam_read(root, 3, 0) == 0x10441AF4
    assert ecam_read(root, 3, 0x100) == 0x44332211
    assert ecam_read(root, 3, 0, size=2) == 0x1AF4
    assert ecam_read(root, 4, 0) == 0xFFFFFFFF
    assert root.ecam.read(3 << 15 | 0xFFE, 4) == b"\xff" * 4  # crosses the function's end
    assert ecam_read(root, 3, 0x30) == 0  # no expansion ROM
    assert Ecam.SIZE == 1 << 20


def test_full_windows_and_buses_are_refused():
    root = PciRoot(WINDOW32, (WINDOW64[0], 0x10000))
    root.add(FakeFunction(), 1)
    with pytest.raises(ValueError, match="full"):
        root.add(FakeFunction(), 2)
