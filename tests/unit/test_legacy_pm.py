"""The ACPI PM registers: power-off, reset, PM1 status/enable and the SCI level."""

import struct

import pytest

from sandvmm.main.legacy import pm
from sandvmm.main.legacy.pm import PowerManagement


class Board:
    def __init__(self):
        self.power_offs = 0
        self.resets = 0
        self.sci = []
        self.device = PowerManagement(on_power_off=self._off, on_reset=self._reset, on_sci=self.sci.append)

    def _off(self):
        self.power_offs += 1

    def _reset(self):
        self.resets += 1

    def write16(self, offset, value):
        self.device.write(offset, struct.pack("<H", value))

    def read16(self, offset):
        return struct.unpack("<H", self.device.read(offset, 2))[0]


@pytest.fixture
def board():
    return Board()


def sleep_request(sleep_type):
    return sleep_type << pm.SLP_TYP_SHIFT | pm.SLP_EN


def test_s5_powers_off(board):
    board.write16(pm.PM1_CONTROL, sleep_request(pm.SLP_TYP_S5))
    assert board.power_offs == 1
    assert board.resets == 0


def test_linux_poweroff_sequence(board):
    # acpi_hw_legacy_sleep: clear WAK_STS and the fixed status bits, write SLP_TYP alone,
    # then SLP_TYP with SLP_EN.
    board.write16(pm.PM1_STATUS, 0xFFFF)
    control = board.read16(pm.PM1_CONTROL) & ~(pm.SLP_TYP_MASK | pm.SLP_EN)
    board.write16(pm.PM1_CONTROL, control | pm.SLP_TYP_S5 << pm.SLP_TYP_SHIFT)
    assert board.power_offs == 0
    board.write16(pm.PM1_CONTROL, control | sleep_request(pm.SLP_TYP_S5))
    assert board.power_offs == 1


@pytest.mark.parametrize("sleep_type", [t for t in range(8) if t != pm.SLP_TYP_S5])
def test_other_sleep_types_do_not_power_off(board, sleep_type):
    board.write16(pm.PM1_CONTROL, sleep_request(sleep_type))
    assert board.power_offs == 0
    assert board.read16(pm.PM1_STATUS) & pm.WAK_STS, "an unsupported sleep wakes at once"


def test_slp_typ_without_slp_en_does_nothing(board):
    board.write16(pm.PM1_CONTROL, pm.SLP_TYP_S5 << pm.SLP_TYP_SHIFT)
    assert board.power_offs == 0


def test_control_reads_back_with_sci_en_and_without_write_only_bits(board):
    assert board.read16(pm.PM1_CONTROL) == pm.SCI_EN
    board.write16(pm.PM1_CONTROL, 3 << pm.SLP_TYP_SHIFT | pm.SLP_EN | pm.GBL_RLS)
    assert board.read16(pm.PM1_CONTROL) == pm.SCI_EN | 3 << pm.SLP_TYP_SHIFT


def test_byte_writes_to_control_power_off_on_the_high_byte(board):
    value = sleep_request(pm.SLP_TYP_S5)
    board.device.write(pm.PM1_CONTROL, bytes([value & 0xFF]))
    assert board.power_offs == 0
    board.device.write(pm.PM1_CONTROL + 1, bytes([value >> 8]))
    assert board.power_offs == 1


def test_reset_register(board):
    board.device.write(pm.RESET_REGISTER, bytes([pm.RESET_VALUE]))
    assert board.resets == 1
    assert board.power_offs == 0


@pytest.mark.parametrize("value", [0x00, 0x01, 0x02, 0x04, 0x0E, 0xFF])
def test_other_reset_values_do_nothing(board, value):
    board.device.write(pm.RESET_REGISTER, bytes([value]))
    assert board.resets == 0


def test_reset_register_reads_zero(board):
    assert board.device.read(pm.RESET_REGISTER, 1) == b"\x00"


def test_status_bits_are_write_one_to_clear(board):
    board.device.press_power_button()
    assert board.read16(pm.PM1_STATUS) == pm.PWRBTN_STS
    board.write16(pm.PM1_STATUS, 0)
    assert board.read16(pm.PM1_STATUS) == pm.PWRBTN_STS
    board.write16(pm.PM1_STATUS, pm.TMR_STS)
    assert board.read16(pm.PM1_STATUS) == pm.PWRBTN_STS
    board.write16(pm.PM1_STATUS, pm.PWRBTN_STS)
    assert board.read16(pm.PM1_STATUS) == 0


def test_enable_register_round_trips(board):
    board.write16(pm.PM1_ENABLE, 0x0521)
    assert board.read16(pm.PM1_ENABLE) == 0x0521


def test_power_button_raises_sci_only_when_enabled(board):
    board.device.press_power_button()
    assert board.sci == []
    board.write16(pm.PM1_ENABLE, pm.PWRBTN_STS)
    assert board.sci == [True]
    board.write16(pm.PM1_STATUS, pm.PWRBTN_STS)
    assert board.sci == [True, False]
    board.device.press_power_button()
    board.device.press_power_button()
    assert board.sci == [True, False, True], "the level is reported on changes only"
    board.write16(pm.PM1_ENABLE, 0)
    assert board.sci == [True, False, True, False]


def test_wak_sts_never_raises_sci(board):
    board.write16(pm.PM1_ENABLE, 0xFFFF)
    board.write16(pm.PM1_CONTROL, sleep_request(1))
    assert board.read16(pm.PM1_STATUS) & pm.WAK_STS
    assert board.sci == []


def test_sci_callback_is_optional():
    device = PowerManagement(on_power_off=lambda: None, on_reset=lambda: None)
    device.write(pm.PM1_ENABLE, struct.pack("<H", pm.PWRBTN_STS))
    device.press_power_button()


def test_a_dword_access_spans_status_and_enable(board):
    board.device.press_power_button()
    board.write16(pm.PM1_ENABLE, 0x0100)
    assert struct.unpack("<I", board.device.read(pm.PM1_STATUS, 4))[0] == 0x0100_0100
    board.device.write(pm.PM1_STATUS, struct.pack("<I", 0x0000_0100))  # clear status, disable
    assert struct.unpack("<I", board.device.read(pm.PM1_STATUS, 4))[0] == 0


def test_reserved_and_outside_offsets(board):
    assert board.device.read(6, 2) == b"\x00\x00"
    assert board.device.read(9, 7) == bytes(7)
    assert board.device.read(15, 2) == b"\x00\xff"
    assert board.device.read(-1, 1) == b"\xff"
    assert board.device.read(0, 0) == b""
    board.device.write(-4, b"\x06" * 20)  # spans everything: reset byte included
    assert board.resets == 1


def test_constants_match_the_acpi_tables():
    acpi = pytest.importorskip("sandvmm.main.acpi")
    for name in ("SCI_EN", "SLP_TYP_SHIFT", "SLP_TYP_MASK", "SLP_EN", "SLP_TYP_S5", "RESET_VALUE",
                 "PM1_EVT_LEN", "PM1_CNT_LEN"):
        if hasattr(acpi, name):
            assert getattr(acpi, name) == getattr(pm, name), name
    assert getattr(acpi, "PM1_PWRBTN", pm.PWRBTN_STS) == pm.PWRBTN_STS
    assert getattr(acpi, "PM1_WAK", pm.WAK_STS) == pm.WAK_STS
