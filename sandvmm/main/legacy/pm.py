"""The ACPI fixed-hardware PM registers: how the guest powers off and reboots.

One bus device, 16 bytes long (the VMM puts it at port 0x600 and the FADT points at it):

    offset 0  PM1a_STS  u16  PM1a_EVT_BLK; status bits are write-1-to-clear
    offset 2  PM1a_EN   u16
    offset 4  PM1a_CNT  u16  PM1a_CNT_BLK
    offset 8  RESET_REG u8   the FADT's reset register
    (other offsets are reserved: they read as 0 and ignore writes)

Accesses may be any width: each byte lands in its register, so a u16 write, two byte
writes, or a u32 write across STS and EN all work. A write to PM1a_CNT with SLP_EN set
and SLP_TYP = 5 (the DSDT's \\_S5) calls `on_power_off()`. Other sleep types are not
offered in the DSDT; if a guest asks anyway it "wakes" at once (WAK_STS is set), so
ACPICA's wait for wake-up ends instead of spinning. PM1a_CNT always reads with SCI_EN
set: the platform is always in ACPI mode (the FADT has no SMI_CMD). Writing RESET_VALUE
to the reset register calls `on_reset()`.

The SCI is level-triggered: it is asserted while any PM1 status bit is set with its
enable bit. If `on_sci` is given it is called with the new level whenever that changes,
e.g. after `press_power_button()` (how the VMM asks for a clean shutdown) and again when
the guest clears the status bit. `on_sci` runs with the device lock held, so levels from
concurrent vCPUs cannot arrive out of order and leave the line wrong; it must not call
back into the device. `on_power_off` and `on_reset` run after the lock is released.
"""

from __future__ import annotations

import threading
from typing import Callable

PM1_STATUS = 0
PM1_ENABLE = 2
PM1_CONTROL = 4
RESET_REGISTER = 8
LENGTH = 16
PM1_EVT_LEN = 4  # the FADT's PM1_EVT_LEN: status then enable
PM1_CNT_LEN = 2

# PM1 status and enable bits (the same positions in both registers).
TMR_STS = 1 << 0
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15  # status only
SCI_SOURCES = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

# PM1 control bits.
SCI_EN = 1 << 0
GBL_RLS = 1 << 2  # write-only
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13  # write-only
SLP_TYP_S5 = 5
WRITE_ONLY_CONTROL = GBL_RLS | SLP_EN

RESET_VALUE = 0x06


class PowerManagement:
    def __init__(self, on_power_off: Callable[[], None], on_reset: Callable[[], None],
                 on_sci: Callable[[bool], None] | None = None):
        self._on_power_off = on_power_off
        self._on_reset = on_reset
        self._on_sci = on_sci
        self._lock = threading.Lock()
        self._status = 0
        self._enable = 0
        self._control = 0
        self._sci = False

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        with self._lock:
            return bytes(self._read_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        power_off = reset = False
        with self._lock:
            control_written = False
            for address, byte in enumerate(data, start=offset):
                register, shift = address & ~1, (address & 1) * 8
                if register == PM1_STATUS:
                    self._status &= ~(byte << shift)
                elif register == PM1_ENABLE:
                    self._enable = self._enable & ~(0xFF << shift) | byte << shift
                elif register == PM1_CONTROL:
                    self._control = self._control & ~(0xFF << shift) | byte << shift
                    control_written = True
                elif address == RESET_REGISTER:
                    reset = reset or byte == RESET_VALUE
            if control_written:
                power_off = self._sleep_requested()
            self._update_sci()
        if power_off:
            self._on_power_off()
        if reset:
            self._on_reset()

    def press_power_button(self) -> None:
        """Report a power-button press, the ACPI way of asking the guest to shut down."""
        with self._lock:
            self._status |= PWRBTN_STS
            self._update_sci()

    def _read_byte(self, address: int) -> int:
        register, shift = address & ~1, (address & 1) * 8
        if register == PM1_STATUS:
            value = self._status
        elif register == PM1_ENABLE:
            value = self._enable
        elif register == PM1_CONTROL:
            value = self._control | SCI_EN
        elif 0 <= address < LENGTH:
            return 0
        else:
            return 0xFF  # outside the block, as an unclaimed port reads
        return value >> shift & 0xFF

    def _sleep_requested(self) -> bool:
        """Act on a PM1_CNT write's SLP_EN; True to power off."""
        sleep = self._control & SLP_EN
        self._control &= ~WRITE_ONLY_CONTROL  # they act once and read back as 0
        if not sleep:
            return False
        if (self._control & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5:
            return True
        self._status |= WAK_STS
        return False

    def _update_sci(self) -> None:
        level = bool(self._status & self._enable & SCI_SOURCES)
        if level != self._sci:
            self._sci = level
            if self._on_sci is not None:
                self._on_sci(level)
