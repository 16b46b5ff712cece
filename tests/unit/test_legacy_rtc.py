"""The CMOS RTC against a fixed clock, read and set the way Linux does it."""

from datetime import datetime, timezone

import pytest

from sandvmm.main.legacy.rtc import Rtc

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
SET, BINARY, H24 = 0x80, 0x04, 0x02

# A Thursday afternoon in a leap year.
MOMENT = datetime(2024, 2, 29, 13, 5, 9, 250_000, tzinfo=timezone.utc)


class Clock:
    def __init__(self, moment=MOMENT):
        self.now = moment.timestamp()

    def __call__(self):
        return self.now


class Cmos:
    def __init__(self, moment=MOMENT):
        self.clock = Clock(moment)
        self.rtc = Rtc(now=self.clock)

    def read(self, index):
        self.rtc.write(0, bytes([index]))
        return self.rtc.read(1, 1)[0]

    def write(self, index, value):
        self.rtc.write(0, bytes([index]))
        self.rtc.write(1, bytes([value]))


@pytest.fixture
def cmos():
    return Cmos()


def bcd(value):
    return (value // 10) << 4 | value % 10


def linux_get_time(cmos, century_register=CENTURY):
    """mc146818_get_time: avoid UIP, read, recheck the seconds, convert."""
    for _ in range(20):
        seconds = cmos.read(SECONDS)
        if cmos.read(REG_A) & 0x80:
            continue
        if seconds != cmos.read(SECONDS):
            continue
        fields = [seconds] + [cmos.read(i) for i in (MINUTES, HOURS, DAY, MONTH, YEAR)]
        century = cmos.read(century_register)
        control = cmos.read(REG_B)
        if cmos.read(REG_A) & 0x80 or seconds != cmos.read(SECONDS):
            continue
        break
    else:
        raise AssertionError("UIP never cleared")
    if not control & BINARY:
        fields = [(v >> 4) * 10 + (v & 0x0F) for v in fields]
        century = (century >> 4) * 10 + (century & 0x0F)
    second, minute, hour, day, month, year = fields
    return datetime(century * 100 + year, month, day, hour, minute, second, tzinfo=timezone.utc)


def linux_set_time(cmos, moment):
    """mc146818_set_time with an FADT century register, in BCD mode."""
    control = cmos.read(REG_B)
    cmos.write(REG_B, control | SET)
    freq = cmos.read(REG_A)
    cmos.write(REG_A, freq | 0x70)  # divider reset
    for index, value in ((YEAR, moment.year % 100), (MONTH, moment.month), (DAY, moment.day),
                         (HOURS, moment.hour), (MINUTES, moment.minute), (SECONDS, moment.second),
                         (CENTURY, moment.year // 100)):
        cmos.write(index, bcd(value))
    cmos.write(REG_B, control)
    cmos.write(REG_A, freq)


def test_bcd_by_default(cmos):
    expected = {SECONDS: 0x09, MINUTES: 0x05, HOURS: 0x13, WEEKDAY: 0x05, DAY: 0x29,
                MONTH: 0x02, YEAR: 0x24, CENTURY: 0x20}
    assert {index: cmos.read(index) for index in expected} == expected


def test_binary_mode(cmos):
    cmos.write(REG_B, H24 | BINARY)
    expected = {SECONDS: 9, MINUTES: 5, HOURS: 13, WEEKDAY: 5, DAY: 29, MONTH: 2, YEAR: 24, CENTURY: 20}
    assert {index: cmos.read(index) for index in expected} == expected


@pytest.mark.parametrize("hour, bcd_value, binary_value", [
    (0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11), (12, 0x92, 0x8C), (13, 0x81, 0x81), (23, 0x91, 0x8B),
])
def test_twelve_hour_mode(hour, bcd_value, binary_value):
    cmos = Cmos(MOMENT.replace(hour=hour))
    cmos.write(REG_B, 0)
    assert cmos.read(HOURS) == bcd_value
    cmos.write(REG_B, BINARY)
    assert cmos.read(HOURS) == binary_value


def test_day_of_week_starts_on_sunday():
    assert Cmos(datetime(2024, 3, 3, tzinfo=timezone.utc)).read(WEEKDAY) == 1  # Sunday
    assert Cmos(datetime(2024, 3, 9, tzinfo=timezone.utc)).read(WEEKDAY) == 7  # Saturday


def test_status_registers(cmos):
    assert cmos.read(REG_A) == 0x26
    assert not cmos.read(REG_A) & 0x80, "UIP"
    assert cmos.read(REG_B) == H24
    assert cmos.read(REG_C) == 0
    assert cmos.read(REG_D) == 0x80, "valid RAM and time; bit 6 must be 0 for rtc-cmos"


def test_uip_is_never_set_however_often_it_is_polled(cmos):
    for step in range(2000):
        cmos.clock.now = MOMENT.timestamp() + step * 0.001
        assert not cmos.read(REG_A) & 0x80


def test_register_a_keeps_its_rate_bits_but_not_uip(cmos):
    cmos.write(REG_A, 0xFF)
    assert cmos.read(REG_A) == 0x7F


def test_read_only_registers_ignore_writes(cmos):
    cmos.write(REG_C, 0xFF)
    cmos.write(REG_D, 0x00)
    assert cmos.read(REG_C) == 0
    assert cmos.read(REG_D) == 0x80


def test_clock_follows_the_host(cmos):
    cmos.clock.now += 61
    assert (cmos.read(MINUTES), cmos.read(SECONDS)) == (0x06, 0x10)


def test_rollover_into_the_next_century():
    cmos = Cmos(datetime(2099, 12, 31, 23, 59, 59, tzinfo=timezone.utc))
    cmos.clock.now += 1
    assert [cmos.read(i) for i in (YEAR, CENTURY, MONTH, DAY, HOURS)] == [0x00, 0x21, 0x01, 0x01, 0x00]


def test_linux_reads_the_wall_clock(cmos):
    assert linux_get_time(cmos) == MOMENT.replace(microsecond=0)
    cmos.write(REG_B, H24 | BINARY)
    assert linux_get_time(cmos) == MOMENT.replace(microsecond=0)


def test_nmi_bit_of_the_index_is_ignored(cmos):
    cmos.rtc.write(0, bytes([0x80 | CENTURY]))
    assert cmos.rtc.read(1, 1) == b"\x20"


def test_other_bytes_are_plain_storage(cmos):
    for index in (0x01, 0x0E, 0x10, 0x31, 0x33, 0x7F):
        cmos.write(index, index ^ 0xA5)
    for index in (0x01, 0x0E, 0x10, 0x31, 0x33, 0x7F):
        assert cmos.read(index) == index ^ 0xA5


def test_index_port_reads_all_ones(cmos):
    assert cmos.rtc.read(0, 1) == b"\xff"
    assert cmos.rtc.read(2, 1) == b"\xff"


def test_wide_accesses_use_the_first_byte(cmos):
    cmos.rtc.write(0, bytes([SECONDS, 0x55]))
    assert cmos.rtc.read(1, 2) == b"\x09\x00"
    assert cmos.rtc.read(1, 0) == b""
    cmos.rtc.write(1, b"")


def test_linux_sets_the_clock(cmos):
    target = datetime(2031, 7, 4, 8, 30, 15, tzinfo=timezone.utc)
    linux_set_time(cmos, target)
    assert linux_get_time(cmos) == target
    cmos.clock.now += 45
    assert linux_get_time(cmos) == target.replace(second=0, minute=31)
    assert cmos.read(WEEKDAY) == 6, "day of week follows the date (a Friday)"
    assert cmos.read(REG_B) == H24


def test_registers_hold_still_while_set(cmos):
    cmos.write(REG_B, H24 | SET)
    cmos.clock.now += 10
    assert cmos.read(SECONDS) == 0x09
    cmos.write(MINUTES, 0x45)
    assert cmos.read(MINUTES) == 0x45
    cmos.write(REG_B, H24)
    assert cmos.read(MINUTES) == 0x45
    assert cmos.read(SECONDS) == 0x09


def test_set_clears_uie(cmos):
    cmos.write(REG_B, H24 | SET | 0x10)
    assert cmos.read(REG_B) == H24 | SET


def test_single_field_write_takes_effect_at_once(cmos):
    cmos.write(HOURS, 0x22)
    assert cmos.read(HOURS) == 0x22
    assert cmos.read(MINUTES) == 0x05


def test_twelve_hour_write(cmos):
    cmos.write(REG_B, BINARY)
    cmos.write(HOURS, 0x80 | 7)  # 7 PM
    cmos.write(REG_B, H24 | BINARY)
    assert cmos.read(HOURS) == 19


def test_an_impossible_date_is_ignored(cmos):
    cmos.write(DAY, 0x31)  # February 31st
    assert cmos.read(DAY) == 0x29
    cmos.write(REG_B, H24 | SET)
    cmos.write(MONTH, 0x13)
    cmos.write(REG_B, H24)
    assert cmos.read(MONTH) == 0x02
    assert linux_get_time(cmos) == MOMENT.replace(microsecond=0)


def test_guest_date_at_the_end_of_the_calendar_never_breaks_reads(cmos):
    cmos.write(REG_B, H24 | BINARY | SET)
    for index, value in ((CENTURY, 99), (YEAR, 99), (MONTH, 12), (DAY, 31), (HOURS, 23), (MINUTES, 59),
                         (SECONDS, 59)):
        cmos.write(index, value)
    cmos.write(REG_B, H24 | BINARY)
    cmos.clock.now += 10 * 365 * 86400
    assert (cmos.read(CENTURY), cmos.read(YEAR)) == (99, 99)


def test_defaults_to_the_host_clock():
    rtc = Rtc()
    rtc.write(0, bytes([CENTURY]))
    assert rtc.read(1, 1)[0] >= 0x20
