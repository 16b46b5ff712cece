"""The 16550A UART, driven the way Linux's 8250 driver drives it."""

import threading

import pytest

from sandvmm.main.legacy import serial as uart
from sandvmm.main.legacy.serial import Serial
from tests.unit.serial_rig import (
    DLL, DLM, EFR, FCR, IER, IIR, LCR, LSR, MCR, MSR, RBR, SCR, THR, LinuxTty, Port, drain, linux_autoconfig,
    linux_size_fifo, linux_startup,
)


@pytest.fixture
def port():
    return Port()


# --- probing -------------------------------------------------------------------------------

def test_linux_autoconfig_detects_a_16550a(port):
    assert linux_autoconfig(port, full_probe=False) == "16550A"


def test_linux_full_probe_rules_out_every_16550a_variant(port):
    assert linux_autoconfig(port, full_probe=True) == "16550A"
    assert port.output == b"", "the probe's loopback traffic must not reach the host"


def test_linux_startup_flags_no_bugs(port):
    linux_autoconfig(port)
    assert linux_startup(port) == set()


def test_linux_startup_flags_no_bugs_with_fifos_enabled(port):
    port.outb(FCR, 0x81)
    assert linux_startup(port) == set()


def test_iir_reports_fifos_after_fcr_enable(port):
    assert port.inb(IIR) == 0x01
    port.outb(FCR, 0x07)
    assert port.inb(IIR) == 0xC1
    port.outb(FCR, 0x00)
    assert port.inb(IIR) == 0x01


def test_fcr_64_byte_bit_never_shows_in_iir(port):
    for lcr in (0x00, 0x80, 0xBF):
        port.outb(LCR, lcr)
        port.outb(FCR, 0x21)
        assert port.inb(IIR) & 0x30 == 0


def test_efr_position_never_reads_zero(port):
    for lcr in (0x80, 0xBF):
        port.outb(LCR, lcr)
        assert port.inb(EFR) != 0


def test_scratch_register_round_trips(port):
    for value in (0x00, 0xA5, 0x5A, 0xFF):
        port.outb(SCR, value)
        assert port.inb(SCR) == value


def test_ier_upper_nibble_reads_zero(port):
    port.outb(IER, 0xFF)
    assert port.inb(IER) == 0x0F


def test_mcr_keeps_only_16550_bits(port):
    port.outb(MCR, 0xFF)
    assert port.inb(MCR) == 0x1F


def test_loopback_modem_lines_follow_mcr(port):
    port.outb(MCR, 0x10)
    assert port.inb(MSR) & 0xF0 == 0
    for mcr_bit, msr_bit in ((0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80)):
        port.outb(MCR, 0x10 | mcr_bit)
        assert port.inb(MSR) & 0xF0 == msr_bit


def test_modem_lines_without_loopback_say_connected(port):
    assert port.inb(MSR) & 0xF0 == 0x10 | 0x20 | 0x80  # CTS, DSR, DCD


def test_msr_deltas_latch_until_read(port):
    port.outb(MCR, 0x10 | 0x04)  # loopback with OUT1: CTS, DSR and DCD drop, RI rises
    msr = port.inb(MSR)
    assert msr & 0x0F == 0x01 | 0x02 | 0x08  # DCTS, DDSR, DDCD; a rising RI is no delta
    assert port.inb(MSR) & 0x0F == 0
    port.outb(MCR, 0x10)  # RI falls: trailing edge
    assert port.inb(MSR) & 0x04


def test_loopback_routes_thr_to_rbr(port):
    port.outb(MCR, 0x10)
    port.outb(THR, ord("Q"))
    assert port.output == b""
    assert port.inb(LSR) & 0x01
    assert port.inb(RBR) == ord("Q")
    assert not port.inb(LSR) & 0x01


def test_loopback_overrun_sets_oe_once(port):
    port.outb(MCR, 0x10)
    port.outb(THR, 1)
    port.outb(THR, 2)  # FIFOs off: one-byte receiver
    lsr = port.inb(LSR)
    assert lsr & 0x03 == 0x03
    assert not port.inb(LSR) & 0x02
    assert port.inb(RBR) == 1


def test_loopback_fifo_holds_sixteen(port):
    port.outb(FCR, 0x07)
    assert linux_size_fifo(port) == 16


def test_dlab_switches_offsets_0_and_1(port):
    port.outb(IER, 0x05)
    port.outb(LCR, 0x83)
    port.outb(DLL, 0x01)
    port.outb(DLM, 0x02)
    assert port.inb(DLL) == 0x01 and port.inb(DLM) == 0x02
    assert port.output == b"", "a DLL write is not a transmission"
    port.outb(LCR, 0x03)
    assert port.inb(IER) == 0x05
    port.outb(LCR, 0x83)
    assert (port.inb(DLL), port.inb(DLM)) == (0x01, 0x02)
    assert port.inb(LCR) == 0x83


def test_iir_and_scratch_are_unaffected_by_dlab(port):
    port.outb(LCR, 0x80)
    port.outb(SCR, 0x42)
    port.outb(FCR, 0x01)
    assert port.inb(IIR) == 0xC1
    port.outb(LCR, 0x00)
    assert port.inb(SCR) == 0x42


# --- transmit --------------------------------------------------------------------------------

def test_thr_write_goes_straight_to_the_host(port):
    for byte in b"hi\n":
        port.outb(THR, byte)
    assert port.output == b"hi\n"
    assert port.inb(LSR) & 0x60 == 0x60


def test_thre_interrupt_fires_when_etbei_is_enabled(port):
    port.outb(IER, 0x02)
    assert port.interrupts == 1
    assert port.uart.interrupt_pending
    assert port.inb(IIR) == 0x02
    assert port.inb(IIR) == 0x01, "reading IIR acknowledges THRE"
    assert not port.uart.interrupt_pending


def test_thre_interrupt_comes_back_after_a_thr_write(port):
    port.outb(IER, 0x02)
    port.inb(IIR)
    port.outb(THR, ord("x"))
    assert port.interrupts == 2
    assert port.inb(IIR) == 0x02


def test_reenabling_etbei_raises_thre_again(port):
    port.outb(IER, 0x02)
    port.inb(IIR)
    port.outb(IER, 0x02)  # no transition: nothing new
    assert port.interrupts == 1
    port.outb(IER, 0x00)
    port.outb(IER, 0x02)
    assert port.interrupts == 2


def test_no_edge_while_the_line_is_already_high(port):
    port.outb(IER, 0x02)
    port.outb(THR, 1)
    port.outb(THR, 2)
    assert port.interrupts == 1


def test_linux_tty_writes_arrive_in_order_by_interrupt(port):
    tty = LinuxTty(port)
    message = bytes(range(256)) * 5
    tty.write(message)
    tty.deliver()
    assert port.output == message
    assert not port.uart.interrupt_pending
    assert tty.gave_up == 0


def test_console_write_with_ier_saved_restarts_interrupt_driven_tx(port):
    tty = LinuxTty(port)
    tty.write(b"x" * 40)
    tty.latched = False  # the interrupt is "in flight" while the console prints
    ier = port.inb(IER)
    port.outb(IER, 0)
    for byte in b"printk\n":
        assert port.inb(LSR) & 0x60 == 0x60
        port.outb(THR, byte)
    port.outb(IER, ier)
    assert tty.latched, "restoring ETBEI must raise THRE again"
    tty.deliver()
    assert port.output == b"printk\n" + b"x" * 40


# --- receive ---------------------------------------------------------------------------------

def test_rx_data_sets_dr_and_raises_an_interrupt(port):
    port.outb(IER, 0x01)
    assert port.uart.feed(b"a") == 1
    assert port.interrupts == 1
    assert port.inb(LSR) & 0x01
    assert port.inb(IIR) == 0x04
    assert port.inb(RBR) == ord("a")
    assert not port.inb(LSR) & 0x01
    assert port.inb(IIR) == 0x01


def test_rx_below_trigger_level_reports_character_timeout(port):
    port.outb(FCR, 0x81)  # trigger at 8
    port.outb(IER, 0x01)
    port.uart.feed(b"abc")
    assert port.inb(IIR) == 0xCC
    port.uart.feed(b"defgh")
    assert port.inb(IIR) == 0xC4


def test_rx_without_erbfi_is_polled_not_interrupted(port):
    port.uart.feed(b"z")
    assert port.interrupts == 0
    assert port.inb(LSR) & 0x01
    port.outb(IER, 0x01)
    assert port.interrupts == 1, "enabling ERBFI with data waiting raises the line"


def test_rx_data_beats_thre_in_priority(port):
    port.outb(IER, 0x03)
    port.uart.feed(b"k")
    assert port.inb(IIR) == 0x04
    port.inb(RBR)
    assert port.inb(IIR) == 0x02


def test_line_status_interrupt_has_top_priority(port):
    port.outb(MCR, 0x10)
    port.outb(THR, 1)
    port.outb(THR, 2)
    port.outb(IER, 0x07)
    assert port.inb(IIR) == 0x06
    port.inb(LSR)
    assert port.inb(IIR) == 0x04


def test_modem_status_interrupt(port):
    port.outb(IER, 0x08)
    port.outb(MCR, 0x10)
    assert port.interrupts == 1
    assert port.inb(IIR) == 0x00
    port.inb(MSR)
    assert port.inb(IIR) == 0x01


def test_empty_rbr_reads_the_last_byte(port):
    port.uart.feed(b"q")
    assert port.inb(RBR) == ord("q")
    assert port.inb(RBR) == ord("q")


def test_linux_tty_receives_a_large_paste_in_order(port):
    tty = LinuxTty(port)
    data = bytes(i % 251 for i in range(20_000))
    fed = 0
    for _ in range(1000):
        fed += port.uart.feed(data[fed:])
        tty.deliver()
        if fed == len(data) and not tty.latched:
            break
    assert bytes(tty.received) == data
    assert not port.uart.interrupt_pending


def test_feed_applies_back_pressure():
    p = Port(input_capacity=8)
    assert p.uart.feed(b"0123456789abcdef") == 8
    assert p.uart.input_space() == 1, "one byte already moved into the 1-byte RBR"
    assert p.space_calls == 0
    assert drain(p) == b"01234567"
    assert p.space_calls == 1
    assert p.uart.input_space() == 8


def test_input_space_is_only_announced_after_a_short_feed():
    p = Port(input_capacity=8)
    p.uart.feed(b"abc")
    assert drain(p) == b"abc"
    assert p.space_calls == 0


def test_loopback_keeps_host_input_waiting(port):
    port.outb(MCR, 0x10)
    port.uart.feed(b"host")
    assert not port.inb(LSR) & 0x01
    port.outb(MCR, 0x00)
    assert drain(port) == b"host"


def test_fifo_clear_drops_only_what_the_fifo_holds(port):
    port.outb(FCR, 0x01)
    port.uart.feed(bytes(range(40)))
    port.outb(FCR, 0x03)
    assert drain(port) == bytes(range(16, 40))


def test_rx_loop_ends_after_one_fifo_of_input(port):
    """Input is paced: a read-until-DR-clears loop cannot be kept busy forever."""
    port.outb(FCR, 0x01)
    port.uart.feed(bytes(100))
    count = 0
    while port.inb(LSR) & 0x01:
        port.inb(RBR)
        count += 1
    assert count == uart.FIFO_SIZE
    assert port.inb(LSR) & 0x01, "the next batch arrived once the guest saw the FIFO empty"


def test_host_input_sends_an_edge_even_while_the_line_is_high(port):
    port.outb(IER, 0x03)  # THRE is pending: the line is already high
    assert port.interrupts == 1
    port.uart.feed(b"a")
    assert port.interrupts == 2
    port.outb(IER, 0x02)
    port.uart.feed(b"b")  # ERBFI off: no receive interrupt, no edge
    assert port.interrupts == 2


def test_handler_that_hits_its_pass_limit_is_run_again(port):
    tty = LinuxTty(port)
    data = bytes(i % 253 for i in range(20_000))
    tty.write(b"y" * 3000)  # busy in both directions
    fed = 0
    for _ in range(1000):
        fed += port.uart.feed(data[fed:])
        tty.deliver(pass_limit=3)
        if fed == len(data) and not tty.latched:
            break
    assert tty.gave_up > 0
    assert bytes(tty.received) == data
    assert port.output == b"y" * 3000
    assert not port.uart.interrupt_pending


# --- bus edge cases ----------------------------------------------------------------------------

def test_wide_accesses_use_the_first_byte(port):
    assert port.uart.read(LSR, 4) == bytes([0x60, 0, 0, 0])
    port.uart.write(THR, b"AB")
    assert port.output == b"A"
    assert port.uart.read(SCR, 0) == b""
    port.uart.write(SCR, b"")


def test_offsets_outside_the_device_read_all_ones(port):
    assert port.uart.read(8, 2) == b"\xff\xff"
    assert port.uart.read(-1, 1) == b"\xff"
    port.uart.write(9, b"\x01")
    assert port.output == b""


def test_interrupt_callback_may_call_back_into_the_device():
    seen = []
    holder = {}

    def on_interrupt():
        seen.append(holder["uart"].read(IIR, 1)[0])

    device = Serial(lambda data: None, on_interrupt)
    holder["uart"] = device
    worker = threading.Thread(target=device.write, args=(IER, b"\x02"))
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "deadlock: on_interrupt ran under the device lock"
    assert seen == [0x02]


def test_concurrent_writers_lose_nothing():
    output = bytearray()
    device = Serial(output.extend, lambda: None)

    def writer(byte):
        for _ in range(2000):
            device.write(THR, bytes([byte]))
            device.read(LSR, 1)

    threads = [threading.Thread(target=writer, args=(b,)) for b in b"abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(output) == sorted(b"abcd" * 2000)


def test_input_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Serial(lambda data: None, lambda: None, input_capacity=0)
