"""An MC146818 CMOS real-time clock: the wall clock Linux reads at boot.

Two ports (0x70 and 0x71 on a PC), one bus device of length 2:

    offset 0  index (write-only; reads 0xFF). Bit 7 is the PC's NMI-disable gate, ignored.
    offset 1  data: the CMOS byte the index selects

Only the first byte of a wider access is used; reads return it zero-padded to the size.

Clock registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week, 0x07 day,
0x08 month, 0x09 year, and 0x32 century, the byte the FADT's CENTURY field names) show
`now()` taken as UTC, which is what Linux assumes, plus an offset the guest sets by
writing them. They follow register B: BCD unless DM (binary) is set, 12-hour with bit 7
as PM unless 24-hour is set. While register B's SET bit is set the clock registers hold
still and take the guest's writes; clearing SET starts the clock from what was written
(Linux's mc146818_set_time does exactly that). A write outside SET changes that one field
at once. A write that does not form a real date is ignored, and the day of week is
always computed from the date.

Each read takes a fresh look at `now()`, so register A's update-in-progress bit is
never set: no update cycle can be caught half done. A reader that straddles a second
boundary sees the seconds change, which Linux's reader already rechecks. Register D
reports valid RAM and time. Nothing here raises IRQ 8, so register C's flags read as 0.
All other bytes are plain battery-backed storage.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

INDEX, DATA = 0, 1

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32  # the IBM PC convention, not part of the MC146818
CMOS_SIZE = 128
INDEX_MASK = 0x7F  # bit 7 of the index is the NMI gate

CLOCK_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

A_UIP = 0x80
B_SET = 0x80
B_UIE = 0x10
B_BINARY = 0x04
B_24_HOUR = 0x02
D_VRT = 0x80
HOUR_PM = 0x80

# Values firmware programs: 32.768 kHz time base with a 1024 Hz periodic rate; BCD and
# 24-hour mode (Linux's rtc-cmos refuses 12-hour mode when it has the RTC interrupt).
INITIAL_REG_A = 0x26
INITIAL_REG_B = B_24_HOUR

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)


def _fields(moment: datetime) -> dict[int, int]:
    """The clock registers' binary, 24-hour values at a moment."""
    return {SECONDS: moment.second, MINUTES: moment.minute, HOURS: moment.hour,
            DAY_OF_WEEK: moment.isoweekday() % 7 + 1,  # 1 = Sunday
            DAY_OF_MONTH: moment.day, MONTH: moment.month,
            YEAR: moment.year % 100, CENTURY: moment.year // 100}


class Rtc:
    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._lock = threading.Lock()
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = INITIAL_REG_A
        self._cmos[REG_B] = INITIAL_REG_B
        self._index = 0
        self._offset = 0.0  # guest clock minus host clock, in seconds
        self._held: dict[int, int] | None = None  # the clock fields while SET is set

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset != DATA:
            return b"\xff" * size
        with self._lock:
            value = self._read(self._index)
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if offset == INDEX:
                self._index = data[0] & INDEX_MASK
            elif offset == DATA:
                self._write(self._index, data[0])

    def _read(self, index: int) -> int:
        if index in CLOCK_REGISTERS:
            return self._encode(index, self._clock()[index])
        if index == REG_A:
            return self._cmos[REG_A] & ~A_UIP
        if index == REG_C:
            return 0
        if index == REG_D:
            return D_VRT
        return self._cmos[index]

    def _write(self, index: int, value: int) -> None:
        if index in CLOCK_REGISTERS:
            fields = self._clock()
            fields[index] = self._decode(index, value)
            if self._held is not None:
                self._held = fields
            else:
                self._start_from(fields)
        elif index == REG_A:
            self._cmos[REG_A] = value & ~A_UIP
        elif index == REG_B:
            self._write_reg_b(value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._cmos[index] = value

    def _write_reg_b(self, value: int) -> None:
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE, per the datasheet
        was_set = self._cmos[REG_B] & B_SET
        if value & B_SET and not was_set:
            self._held = self._clock()
        self._cmos[REG_B] = value
        if was_set and not value & B_SET and self._held is not None:
            held, self._held = self._held, None
            self._start_from(held)

    # --- time ---------------------------------------------------------------------------

    def _clock(self) -> dict[int, int]:
        if self._held is not None:
            return dict(self._held)
        seconds = self._now() + self._offset
        try:
            moment = _EPOCH + timedelta(seconds=seconds)
        except (OverflowError, ValueError):  # a guest-set date that ran off the calendar
            moment = _LATEST if seconds > 0 else _EARLIEST
        return _fields(moment)

    def _start_from(self, fields: dict[int, int]) -> None:
        try:
            moment = datetime(fields[CENTURY] * 100 + fields[YEAR], fields[MONTH], fields[DAY_OF_MONTH],
                              fields[HOURS], fields[MINUTES], fields[SECONDS], tzinfo=timezone.utc)
        except ValueError:
            return  # not a real date (BCD garbage, or a half-written one): keep time
        self._offset = (moment - _EPOCH).total_seconds() - self._now()

    def _encode(self, index: int, value: int) -> int:
        pm = 0
        if index == HOURS and not self._cmos[REG_B] & B_24_HOUR:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        if not self._cmos[REG_B] & B_BINARY:
            value = (value // 10) << 4 | value % 10
        return (value | pm) & 0xFF  # a held guest value need not fit the current mode

    def _decode(self, index: int, value: int) -> int:
        pm = False
        if index == HOURS and not self._cmos[REG_B] & B_24_HOUR:
            pm, value = bool(value & HOUR_PM), value & ~HOUR_PM
        if not self._cmos[REG_B] & B_BINARY:
            value = (value >> 4) * 10 + (value & 0x0F)
        if index == HOURS and not self._cmos[REG_B] & B_24_HOUR:
            value = value % 12 + (12 if pm else 0)
        return value
