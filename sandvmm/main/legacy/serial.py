"""A 16550A UART: the PC serial port that Linux drives as ttyS0.

The device does not know its base or IRQ (COM1 is ports 0x3F8-0x3FF, IRQ 4). Offsets:

    offset  read        write       with LCR.DLAB set
    0       RBR         THR         DLL
    1       IER         IER         DLM
    2       IIR         FCR
    3       LCR         LCR
    4       MCR         MCR
    5       LSR         (ignored)
    6       MSR         (ignored)
    7       SCR         SCR

Only the first byte of a wider access is used; reads return it zero-padded to the size.

Transmit has no baud-rate timing: a byte written to THR goes straight to `on_output` (or,
in loopback mode, to the receiver), so THR and the shift register are always empty and
LSR always reports THRE and TEMT.

Receive applies back-pressure instead of dropping input. `feed()` appends host bytes to
a backlog of at most `input_capacity` bytes and returns how many it took; the caller
offers the rest again later. After a short `feed()`, `on_input_space` (if given) is
called once the backlog has drained, so the caller can wait for it instead of polling
`input_space()`. Backlog bytes enter the receive FIFO (16 bytes, or the single RBR with
FIFOs off) when the host feeds, and when the guest has seen the FIFO empty (LSR without
DR, or an IIR read) - never on the RBR read itself. That paces input like a real line:
a guest's receive loop, which reads until DR clears, ends after at most a FIFO's worth,
instead of finding an endless stream. Host input never overruns the guest.

Interrupts: the VMM injects IRQ 4 as an ISA edge, so the device keeps the 16550's
interrupt output as a line and calls `on_interrupt()` whenever that line rises, i.e. an
enabled condition becomes pending while none was. Linux's handler keeps reading IIR
until it reports nothing pending, so the line falls before the handler returns and the
next condition makes a fresh edge. One exception: host bytes arriving in the FIFO send
an edge even while the line is already high. A busy handler may give up with the line
high (Linux's does after 512 passes, "too much work for irq"), and an edge-triggered
line that never falls would never interrupt again; the extra edge, held by the guest's
interrupt controller until the handler returns, runs it once more.

Callbacks: `on_output` runs with the device lock held, so bytes leave in the order the
UART accepted them. `on_interrupt` and `on_input_space` run after the lock is released,
so they may call back into the device.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
# The upper nibble is reserved on a 16550A. Linux's autoconfig takes a writable bit 6
# for an XScale UART and writable bits 4-5 for a 16750, so they must read back as 0.
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
# Both FIFO bits set is what makes Linux call the part a 16550A. Bit 5 stays clear: it
# is how a 16750 announces its 64-byte FIFO.
IIR_FIFOS_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RX = 0x02
FCR_TRIGGER_MASK = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # indexed by FCR bits 7-6
FIFO_SIZE = 16

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F  # bit 5 is the 16750's auto flow control: absent here

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

# The host end behaves like a connected, ready terminal, so a getty without CLOCAL sees
# carrier and output is never held back by flow control.
HOST_MODEM_LINES = MSR_CTS | MSR_DSR | MSR_DCD

DEFAULT_INPUT_CAPACITY = 4096
DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock, the usual firmware setting


def _modem_lines(mcr: int) -> int:
    """The MSR status bits for a given MCR: the host's lines, or MCR's outputs in loopback."""
    if not mcr & MCR_LOOP:
        return HOST_MODEM_LINES
    # Loopback wiring per the 16550 datasheet: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
    # Linux's probe sets LOOP|OUT2|RTS and expects exactly DCD|CTS back.
    return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
            | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))


class Serial:
    def __init__(self, on_output: Callable[[bytes], None], on_interrupt: Callable[[], None], *,
                 input_capacity: int = DEFAULT_INPUT_CAPACITY,
                 on_input_space: Callable[[], None] | None = None):
        if input_capacity < 1:
            raise ValueError(f"input_capacity must be at least 1, got {input_capacity}")
        self._on_output = on_output
        self._on_interrupt = on_interrupt
        self._on_input_space = on_input_space
        self._input_capacity = input_capacity
        self._lock = threading.Lock()

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0  # FIFO enable and RX trigger bits; the rest are actions, not state
        self._scr = 0
        self._dll, self._dlm = DEFAULT_DIVISOR & 0xFF, DEFAULT_DIVISOR >> 8
        self._line_errors = 0  # LSR error bits, cleared by reading LSR
        self._msr = _modem_lines(0)
        self._rx_fifo: deque[int] = deque()  # what the guest can read now
        self._backlog: deque[int] = deque()  # host input still "on the wire"
        self._last_rx = 0
        self._thre_pending = False
        self._line = False  # the interrupt output, as last reported
        self._input_arrived = False  # host bytes entered the FIFO since the last settle
        self._feed_was_short = False

    # --- bus interface ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if not 0 <= offset < REGISTER_COUNT:
            return b"\xff" * size
        with self._lock:
            value = self._read_register(offset)
            notify = self._settle()
        self._notify(*notify)
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data or not 0 <= offset < REGISTER_COUNT:
            return
        with self._lock:
            self._write_register(offset, data[0])
            notify = self._settle()
        self._notify(*notify)

    # --- host side --------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many leading bytes were taken."""
        with self._lock:
            taken = min(len(data), self._input_capacity - len(self._backlog))
            self._backlog.extend(data[:taken])
            if taken < len(data):
                self._feed_was_short = True
            self._receive_backlog()
            notify = self._settle()
        self._notify(*notify)
        return taken

    def input_space(self) -> int:
        """How many bytes `feed()` would take right now."""
        with self._lock:
            return self._input_capacity - len(self._backlog)

    @property
    def interrupt_pending(self) -> bool:
        """The level of the UART's interrupt output (what IIR would report as pending)."""
        with self._lock:
            return self._line

    # --- registers --------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._dll if dlab else self._pop_received()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = (LSR_DR if self._rx_fifo else 0) | self._line_errors | LSR_THRE | LSR_TEMT
            self._line_errors = 0
            if not self._rx_fifo:
                self._receive_backlog()  # the guest has seen it empty: the next bytes arrive
            return value
        if offset == MSR:
            value = self._msr
            self._msr &= ~MSR_DELTAS
            return value
        return self._scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are factory-test features of real parts; ignored.

    def _pop_received(self) -> int:
        if self._rx_fifo:
            self._last_rx = self._rx_fifo.popleft()
        return self._last_rx  # an empty RBR still holds the last byte received

    def _read_iir(self) -> int:
        source = self._pending_source()
        if source == IIR_THRI:
            # Reading IIR is how the THRE interrupt is acknowledged; the next THR write
            # (or re-enabling ETBEI) raises it again.
            self._thre_pending = False
        if not self._rx_fifo:
            self._receive_backlog()
        return source | (IIR_FIFOS_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0)

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx_fifo) < self._fifo_capacity():
                self._rx_fifo.append(value)
            else:
                self._line_errors |= LSR_OE
        else:
            self._on_output(bytes([value]))
        self._thre_pending = True  # the byte left at once: THR is empty again

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        if value & IER_THRI and not self._ier & IER_THRI:
            # A 16550 raises THRE when ETBEI is enabled while THR is empty, which here
            # is always. Linux's startup tests for exactly this and otherwise marks the
            # port UART_BUG_THRE/TXEN and falls back to polling it with a timer.
            self._thre_pending = True
        self._ier = value

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_ENABLE_FIFO
        # Switching FIFO mode on or off empties the FIFOs, as does CLEAR_RX. The backlog
        # is host input that has not "arrived" yet, so it survives.
        if enable != self._fcr & FCR_ENABLE_FIFO or (enable and value & FCR_CLEAR_RX):
            self._rx_fifo.clear()
        # Per the datasheet the other bits only take effect with FIFO enable set.
        self._fcr = value & (FCR_ENABLE_FIFO | FCR_TRIGGER_MASK) if enable else 0

    def _write_mcr(self, value: int) -> None:
        self._mcr = value & MCR_MASK
        old, new = self._msr & ~MSR_DELTAS, _modem_lines(self._mcr)
        changed = old ^ new
        deltas = (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old & MSR_RI and not new & MSR_RI:
            deltas |= MSR_TERI  # RI reports only its trailing edge
        self._msr = new | (self._msr & MSR_DELTAS) | deltas

    # --- interrupt and receive plumbing -------------------------------------------------

    def _fifo_capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE_FIFO else 1

    def _pending_source(self) -> int:
        """The IIR interrupt identification, by 16550 priority."""
        if self._ier & IER_RLSI and self._line_errors:
            return IIR_RLSI
        if self._ier & IER_RDI and self._rx_fifo:
            if self._fcr & FCR_ENABLE_FIFO:
                trigger = RX_TRIGGER_LEVELS[self._fcr >> 6]
                if len(self._rx_fifo) < trigger:
                    # Below the trigger level a real FIFO reports the character timeout
                    # once the line has been idle; with no line timing it always has.
                    return IIR_RX_TIMEOUT
            return IIR_RDI
        if self._ier & IER_THRI and self._thre_pending:
            return IIR_THRI
        if self._ier & IER_MSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _receive_backlog(self) -> None:
        """Let waiting host bytes arrive, as many as the FIFO has room for."""
        if self._mcr & MCR_LOOP:  # loopback disconnects the receiver from the line
            return
        capacity = self._fifo_capacity()
        while self._backlog and len(self._rx_fifo) < capacity:
            self._rx_fifo.append(self._backlog.popleft())
            self._input_arrived = True

    def _settle(self) -> tuple[bool, bool]:
        """Recompute the interrupt line; say which callbacks are due."""
        line = self._pending_source() != IIR_NO_INT
        edge = line and (not self._line or self._input_arrived and bool(self._ier & IER_RDI))
        self._input_arrived = False
        self._line = line
        space = self._feed_was_short and not self._backlog
        if space:
            self._feed_was_short = False
        return edge, space

    def _notify(self, edge: bool, space: bool) -> None:
        if edge:
            self._on_interrupt()
        if space and self._on_input_space is not None:
            self._on_input_space()
