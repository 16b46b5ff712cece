"""An i8042 keyboard controller with nothing plugged in: enough for Linux's probe and reboot.

A PC decodes the controller at two ports that are not adjacent (0x61-0x63 in between
belong to other devices), and the bus gives a device only its offset, so the controller
exposes two bus devices, each one byte long:

    I8042.data_port     at 0x60: output buffer (read), command parameter / device data (write)
    I8042.command_port  at 0x64: status (read), controller command (write)

Only the first byte of a wider access is used; reads return it zero-padded to the size.

Why it looks the way it does:
- Controller commands answer at once and IBF never reads as set, so Linux's polling
  (i8042_wait_read/i8042_wait_write, 500 ms timeouts) never waits.
- There is no AUX (mouse) channel. Linux's first AUX probe is the AUX loopback command
  (0xD3): its byte comes back without the AUX-data status bit, which Linux takes as "no
  AUX port" at once; the AUX interface test (0xA9) it then runs reports a stuck clock
  line, which ends the AUX probe. A faithful loopback would instead send Linux into an
  IRQ 12 delivery test that times out after 250 ms.
- There is no keyboard. Bytes sent to it are dropped; nothing raises IRQ 1, so Linux's
  atkbd driver gives up on its own, in the background, after its command timeouts.
- Pulsing output-port bit 0 (command 0xFE, Linux's fallback reboot) or writing it as 0
  through command 0xD1 resets the system: `on_reset()` runs, outside the device lock.
- A new controller answer replaces one the guest has not read, so a probe that bails out
  early cannot leave a stale byte ahead of the next answer.
"""

from __future__ import annotations

import threading
from typing import Callable

# Status register bits.
STATUS_OBF = 0x01  # output buffer full
STATUS_IBF = 0x02  # input buffer full: never, commands complete at once
STATUS_SYSTEM = 0x04  # mirrors the command byte's system flag
STATUS_COMMAND = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited; clear makes Linux warn "Keylock active"
STATUS_AUX_DATA = 0x20  # the output buffer holds AUX data

# Command byte (controller RAM byte 0) bits.
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYSTEM = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_TRANSLATE = 0x40
# What PC firmware leaves behind: keyboard interrupt on, POST passed, scancode
# translation on; the AUX port is disabled because there is none.
INITIAL_CTR = CTR_KBD_INT | CTR_SYSTEM | CTR_AUX_DISABLE | CTR_TRANSLATE

# Commands.
CMD_READ_RAM = 0x20  # 0x20-0x3F: read RAM byte n (0x20 reads the command byte)
CMD_WRITE_RAM = 0x60  # 0x60-0x7F: write RAM byte n from the next data byte
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_MODE = 0xCA
CMD_WRITE_MODE = 0xCB
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2
CMD_WRITE_AUX_BUFFER = 0xD3
CMD_WRITE_AUX_DEVICE = 0xD4
CMD_PULSE_OUTPUT = 0xF0  # 0xF0-0xFF: pulse the output-port bits that are 0 in the low nibble
CMD_RESET = 0xFE  # the pulse that matters: bit 0, the CPU reset line

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
INTERFACE_CLOCK_STUCK_HIGH = 0x02  # the AUX answer: nothing drives that clock line
MODE_PS2 = 0x01
OUTPUT_PORT_RESET_HIGH = 0x01  # active low: 0 holds the CPU in reset
OUTPUT_PORT_A20 = 0x02
RAM_SIZE = 32

# Commands whose parameter arrives as the next write to the data port.
_TAKES_PARAMETER = {CMD_WRITE_MODE, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_BUFFER,
                    CMD_WRITE_AUX_BUFFER, CMD_WRITE_AUX_DEVICE, *range(CMD_WRITE_RAM, CMD_WRITE_RAM + RAM_SIZE)}


class _Port:
    """One of the controller's two ports, as a one-byte bus device."""

    def __init__(self, read: Callable[[], int], write: Callable[[int], None]):
        self._read, self._write = read, write

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset != 0:
            return b"\xff" * size
        return bytes([self._read()]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data and offset == 0:
            self._write(data[0])


class I8042:
    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = INITIAL_CTR
        self._mode = MODE_PS2
        self._output_port = OUTPUT_PORT_RESET_HIGH | OUTPUT_PORT_A20
        self._output = 0
        self._output_full = False
        self._last_write_was_command = False
        self._awaiting: int | None = None  # command waiting for its data-port parameter
        self.data_port = _Port(self._read_data, self._write_data)
        self.command_port = _Port(self._read_status, self._write_command)

    def _read_status(self) -> int:
        with self._lock:
            status = STATUS_UNLOCKED | (self._ram[0] & CTR_SYSTEM)
            if self._output_full:
                status |= STATUS_OBF
            if self._last_write_was_command:
                status |= STATUS_COMMAND
            return status

    def _read_data(self) -> int:
        with self._lock:
            self._output_full = False
            return self._output  # an empty buffer still reads its last byte

    def _write_command(self, command: int) -> None:
        with self._lock:
            self._last_write_was_command = True
            self._awaiting = command if command in _TAKES_PARAMETER else None
            reset = self._run_command(command)
        if reset:
            self._on_reset()

    def _write_data(self, value: int) -> None:
        with self._lock:
            self._last_write_was_command = False
            command, self._awaiting = self._awaiting, None
            reset = command is not None and self._take_parameter(command, value)
        if reset:
            self._on_reset()

    def _answer(self, value: int) -> None:
        self._output = value
        self._output_full = True

    def _run_command(self, command: int) -> bool:
        """Carry out a command that needs no parameter; True if it resets the system."""
        if CMD_READ_RAM <= command < CMD_READ_RAM + RAM_SIZE:
            self._answer(self._ram[command - CMD_READ_RAM])
        elif command == CMD_AUX_DISABLE:
            self._ram[0] |= CTR_AUX_DISABLE
        elif command == CMD_AUX_ENABLE:
            self._ram[0] &= ~CTR_AUX_DISABLE
        elif command == CMD_AUX_TEST:
            self._answer(INTERFACE_CLOCK_STUCK_HIGH)
        elif command == CMD_SELF_TEST:
            self._answer(SELF_TEST_PASSED)
        elif command == CMD_KBD_TEST:
            self._answer(INTERFACE_TEST_PASSED)
        elif command == CMD_KBD_DISABLE:
            self._ram[0] |= CTR_KBD_DISABLE
        elif command == CMD_KBD_ENABLE:
            self._ram[0] &= ~CTR_KBD_DISABLE
        elif command == CMD_READ_MODE:
            self._answer(self._mode)
        elif command == CMD_READ_OUTPUT_PORT:
            self._answer(self._output_port)
        elif command >= CMD_PULSE_OUTPUT:
            return not command & OUTPUT_PORT_RESET_HIGH
        return False  # anything else is not implemented and does nothing

    def _take_parameter(self, command: int, value: int) -> bool:
        """Finish a command with its parameter; True if it resets the system."""
        if CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_SIZE:
            self._ram[command - CMD_WRITE_RAM] = value
        elif command == CMD_WRITE_MODE:
            self._mode = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            # The reset line only goes low for the reset itself; the controller comes
            # back with it high, like after a 0xFE pulse.
            self._output_port = value | OUTPUT_PORT_RESET_HIGH
            return not value & OUTPUT_PORT_RESET_HIGH
        elif command in (CMD_WRITE_KBD_BUFFER, CMD_WRITE_AUX_BUFFER):
            # With no AUX channel, AUX loopback data comes back as keyboard data.
            self._answer(value)
        # CMD_WRITE_AUX_DEVICE: there is no mouse to send the byte to.
        return False
