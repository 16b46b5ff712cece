"""The i8042 keyboard controller, probed and reset the way Linux does it."""

import threading

import pytest

from sandvmm.main.legacy import i8042 as kbc
from sandvmm.main.legacy.i8042 import I8042

OBF, IBF, SYS, CMD, UNLOCKED, AUX = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


class Controller:
    def __init__(self):
        self.resets = 0
        self.device = I8042(on_reset=self._reset)

    def _reset(self):
        self.resets += 1

    def status(self):
        return self.device.command_port.read(0, 1)[0]

    def command(self, value):
        self.device.command_port.write(0, bytes([value]))

    def data(self):
        return self.device.data_port.read(0, 1)[0]

    def send(self, value):
        self.device.data_port.write(0, bytes([value]))


@pytest.fixture
def c():
    return Controller()


class LinuxI8042:
    """drivers/input/serio/i8042.c's polling paths. Every wait counts its polls: on this
    controller none may have to poll more than once (the real limit is 10000 x 50 us)."""

    TIMEOUT = 10_000

    def __init__(self, c):
        self.c = c
        self.polls = 0

    def wait_write(self):
        for _ in range(self.TIMEOUT):
            if not self.c.status() & IBF:
                return 0
            self.polls += 1
        return -1

    def wait_read(self):
        for _ in range(self.TIMEOUT):
            if self.c.status() & OBF:
                return 0
            self.polls += 1
        return -1

    def flush(self):
        count = 0
        while self.c.status() & OBF:
            count += 1
            if count > 16:
                return -1
            self.c.data()
        return 0

    def command(self, command, params=()):
        """__i8042_command: returns (error, bytes read)."""
        if self.wait_write():
            return -1, []
        self.c.command(command & 0xFF)
        for value in params:
            if self.wait_write():
                return -1, []
            self.c.send(value)
        answers = []
        for _ in range((command >> 8) & 0xF):
            if self.wait_read():
                return -1, answers
            if command == 0x11D3 and not self.c.status() & AUX:
                return -1, answers  # "auxerr"
            answers.append(self.c.data())
        return 0, answers

    def controller_check(self):
        return self.flush()

    def selftest(self):
        error, answer = self.command(0x01AA)
        return error or answer != [0x55]

    def controller_init(self):
        reads = []
        while len(reads) < 2 or reads[-1] != reads[-2]:
            error, answer = self.command(0x0120)
            assert not error and len(reads) < 10
            reads += answer
        self.ctr = reads[-1] | 0x10  # disable the keyboard interface...
        self.ctr &= ~0x01  # ...and its interrupt
        keylock = not self.c.status() & UNLOCKED
        error, _ = self.command(0x1060, [self.ctr])
        self.flush()
        return error, keylock

    def check_aux(self):
        """i8042_check_aux up to the point where this controller ends it."""
        self.flush()
        error, answer = self.command(0x11D3, [0x5A])
        if error or answer != [0x5A]:
            error, answer = self.command(0x01A9)
            if error or (answer[0] and answer[0] not in (0xFA, 0xFF)):
                return -1
            return "AUX interface test passed: Linux would carry on probing"
        return "AUX loopback worked: Linux would test IRQ 12 delivery (250 ms)"

    def setup_kbd(self):
        self.ctr = self.ctr & ~0x10 | 0x01
        return self.command(0x1060, [self.ctr])[0]


def test_power_on_status(c):
    status = c.status()
    assert not status & (OBF | IBF | AUX)
    assert status & SYS, "POST passed"
    assert status & UNLOCKED, "a clear bit makes Linux warn 'Keylock active'"


def test_linux_probe_finishes_without_waiting(c):
    linux = LinuxI8042(c)
    assert linux.controller_check() == 0
    assert not linux.selftest()
    error, keylock = linux.controller_init()
    assert not error and not keylock
    assert linux.check_aux() == -1, "no AUX port, decided without any timeout"
    assert linux.setup_kbd() == 0
    assert linux.polls == 0
    assert not c.status() & OBF, "nothing left in the output buffer"
    assert c.resets == 0


def test_self_test(c):
    c.command(0xAA)
    assert c.status() & OBF
    assert c.data() == 0x55
    assert not c.status() & OBF


def test_interface_tests(c):
    c.command(0xAB)
    assert c.data() == 0x00
    c.command(0xA9)
    assert c.data() not in (0x00, 0xFA, 0xFF), "AUX must not look present"


def test_command_byte_round_trip(c):
    c.command(0x20)
    assert c.data() == kbc.INITIAL_CTR
    c.command(0x60)
    c.send(0x03)  # interrupts on, system flag off
    c.command(0x20)
    assert c.data() == 0x03
    assert not c.status() & SYS, "status mirrors the command byte's system flag"


def test_controller_ram_beyond_the_command_byte(c):
    c.command(0x65)
    c.send(0x99)
    c.command(0x25)
    assert c.data() == 0x99


def test_enable_and_disable_commands_flip_command_byte_bits(c):
    def ctr():
        c.command(0x20)
        return c.data()

    c.command(0xAD)
    assert ctr() & 0x10
    c.command(0xAE)
    assert not ctr() & 0x10
    c.command(0xA8)
    assert not ctr() & 0x20
    c.command(0xA7)
    assert ctr() & 0x20


def test_controller_mode(c):
    c.command(0xCA)
    assert c.data() & 0x01, "PS/2 mode"
    c.command(0xCB)
    c.send(0x00)
    c.command(0xCA)
    assert c.data() == 0x00


def test_status_tracks_which_port_was_written_last(c):
    c.command(0xAD)
    assert c.status() & CMD
    c.send(0xF4)
    assert not c.status() & CMD


def test_pulse_reset_line_resets(c):
    c.command(0xFE)
    assert c.resets == 1


@pytest.mark.parametrize("command", [0xF0, 0xF2, 0xFC])
def test_any_pulse_of_bit_0_resets(c, command):
    c.command(command)
    assert c.resets == 1


@pytest.mark.parametrize("command", [0xFF, 0xF1, 0xFD])
def test_pulses_that_spare_bit_0_do_not_reset(c, command):
    c.command(command)
    assert c.resets == 0


def test_output_port_write_with_reset_bit_clear_resets(c):
    c.command(0xD0)
    assert c.data() & 0x01
    c.command(0xD1)
    c.send(0xDF)  # the classic "enable A20" write: reset line high
    assert c.resets == 0
    c.command(0xD1)
    c.send(0xDE)
    assert c.resets == 1
    c.command(0xD0)
    assert c.data() & 0x01, "the line comes back high after the reset"


def test_linux_reboot_sequence(c):
    # arch/x86/kernel/reboot.c: kb_wait() for IBF clear, then pulse the reset line.
    for _ in range(10):
        assert not c.status() & IBF
        c.command(0xFE)
    assert c.resets == 10


def test_reset_callback_may_call_back_into_the_device():
    holder = {}

    def on_reset():
        holder["status"] = holder["device"].command_port.read(0, 1)

    device = I8042(on_reset=on_reset)
    holder["device"] = device
    worker = threading.Thread(target=device.command_port.write, args=(0, b"\xfe"))
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "deadlock: on_reset ran under the device lock"
    assert "status" in holder


def test_write_kbd_buffer_echoes_as_keyboard_data(c):
    c.command(0xD2)
    c.send(0x1C)
    assert c.status() & (OBF | AUX) == OBF
    assert c.data() == 0x1C


def test_aux_loopback_comes_back_without_the_aux_bit(c):
    c.command(0xD3)
    c.send(0x5A)
    assert c.status() & (OBF | AUX) == OBF


def test_bytes_for_absent_devices_are_dropped(c):
    c.send(0xF2)  # to the keyboard: identify
    c.command(0xD4)
    c.send(0xF2)  # to the mouse
    assert not c.status() & OBF


def test_a_new_answer_replaces_an_unread_one(c):
    c.command(0xAA)
    c.command(0xAB)
    assert c.data() == 0x00
    assert not c.status() & OBF


def test_a_command_cancels_a_pending_parameter(c):
    c.command(0x60)
    c.command(0xAA)
    c.send(0x00)  # no longer a command byte: goes to the (absent) keyboard
    c.command(0x20)
    assert c.data() == kbc.INITIAL_CTR


def test_unknown_commands_do_nothing(c):
    for command in (0x00, 0x10, 0x90, 0xC0, 0xE0):
        c.command(command)
    assert not c.status() & OBF
    assert c.resets == 0


def test_empty_output_buffer_reads_the_last_byte(c):
    c.command(0xAA)
    assert c.data() == 0x55
    assert c.data() == 0x55


def test_wide_and_odd_accesses(c):
    c.command(0xAA)
    assert c.device.data_port.read(0, 4) == bytes([0x55, 0, 0, 0])
    assert c.device.data_port.read(0, 0) == b""
    assert c.device.command_port.read(1, 2) == b"\xff\xff"
    c.device.command_port.write(0, b"\xfe\x00")
    assert c.resets == 1
    c.device.command_port.write(3, b"\xfe")
    c.device.command_port.write(0, b"")
    assert c.resets == 1
