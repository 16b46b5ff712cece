"""A 16550A UART with recording callbacks, and the register sequences of Linux's 8250
driver replayed against it, for the UART's tests."""

from sandvmm.main.legacy.serial import Serial

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Port:
    """A Serial with recording callbacks and inb/outb-style helpers."""

    def __init__(self, **kwargs):
        self.output = bytearray()
        self.interrupts = 0
        self.space_calls = 0
        self.uart = Serial(self.output.extend, self._interrupt, on_input_space=self._space, **kwargs)

    def _interrupt(self):
        self.interrupts += 1

    def _space(self):
        self.space_calls += 1

    def inb(self, register):
        return self.uart.read(register, 1)[0]

    def outb(self, register, value):
        self.uart.write(register, bytes([value]))


def drain(p):
    """Poll like a driver without interrupts: read while DR, until DR stays clear."""
    received = bytearray()
    idle = 0
    while idle < 2:  # the first clear LSR is what lets the next bytes in
        if p.inb(LSR) & 0x01:
            received.append(p.inb(RBR))
            idle = 0
        else:
            idle += 1
    return bytes(received)


# --- Linux 8250 driver sequences (drivers/tty/serial/8250/8250_port.c) -------------------
# Each helper replays, register by register, what the driver does and returns what it
# would conclude.

def linux_size_fifo(p):
    old_lcr = p.inb(LCR)
    p.outb(LCR, 0)
    old_fcr = p.inb(FCR)  # the driver really reads IIR here and writes it back later
    old_mcr = p.inb(MCR)
    p.outb(FCR, 0x07)
    p.outb(MCR, 0x10)  # loopback
    p.outb(LCR, 0x80)
    old_dl = p.inb(DLL) | p.inb(DLM) << 8
    p.outb(DLL, 1)
    p.outb(DLM, 0)
    p.outb(LCR, 0x03)
    for value in range(256):
        p.outb(THR, value)
    count = 0
    while p.inb(LSR) & 0x01 and count < 256:
        p.inb(RBR)
        count += 1
    p.outb(FCR, old_fcr)
    p.outb(MCR, old_mcr)
    p.outb(LCR, 0x80)
    p.outb(DLL, old_dl & 0xFF)
    p.outb(DLM, old_dl >> 8)
    p.outb(LCR, old_lcr)
    return count


def linux_autoconfig_16550a_variant(p):
    """The CONFIG_SERIAL_8250_16550A_VARIANTS / UPF_FULL_PROBE checks."""
    p.outb(LCR, 0x80)
    if p.inb(EFR) == 0:
        p.outb(EFR, 0xA8)
        return "16650" if p.inb(EFR) != 0 else "16550A_FSL64-or-Motorola"
    p.outb(LCR, 0xBF)
    if p.inb(EFR) == 0:
        return "EFR (16650V2/16850/16C950)"
    p.outb(LCR, 0)
    status1 = p.inb(MCR)
    p.outb(LCR, 0xE0)
    status2 = p.inb(0x02)  # NatSemi EXCR1
    if not (status2 ^ status1) & 0x10:
        p.outb(LCR, 0)
        p.outb(MCR, status1 ^ 0x10)
        p.outb(LCR, 0xE0)
        status2 = p.inb(0x02)
        p.outb(LCR, 0)
        p.outb(MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A"
    p.outb(LCR, 0)
    p.outb(FCR, 0x21)
    status1 = p.inb(IIR) & 0xE0
    p.outb(FCR, 0x01)
    p.outb(LCR, 0x80)
    p.outb(FCR, 0x21)
    status2 = p.inb(IIR) & 0xE0
    p.outb(FCR, 0x01)
    p.outb(LCR, 0)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    ier = p.inb(IER)
    p.outb(IER, ier & ~0x40)
    if not p.inb(IER) & 0x40:
        p.outb(IER, ier | 0x40)
        if p.inb(IER) & 0x40:
            return "XScale"
    p.outb(IER, ier)
    if linux_size_fifo(p) == 64:
        return "U6_16550A"
    return "16550A"


def linux_autoconfig(p, full_probe=True):
    scratch = p.inb(IER)
    p.outb(IER, 0)
    scratch2 = p.inb(IER) & 0x0F
    p.outb(IER, 0x0F)
    scratch3 = p.inb(IER) & 0x0F
    p.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"
    save_mcr, save_lcr = p.inb(MCR), p.inb(LCR)
    p.outb(MCR, 0x10 | 0x08 | 0x02)  # LOOP | OUT2 | RTS
    status = p.inb(MSR) & 0xF0
    p.outb(MCR, save_mcr)
    if status != 0x80 | 0x10:  # DCD | CTS
        return f"LOOP test failed ({status:#x})"
    p.outb(LCR, 0xBF)
    p.outb(EFR, 0)
    p.outb(LCR, 0)
    p.outb(FCR, 0x01)
    fifo_bits = p.inb(IIR) & 0xC0
    if fifo_bits == 0x00:
        p.outb(SCR, 0xA5)
        first = p.inb(SCR)
        p.outb(SCR, 0x5A)
        kind = "16450" if first == 0xA5 and p.inb(SCR) == 0x5A else "8250"
    elif fifo_bits == 0x80:
        kind = "16550"
    elif fifo_bits == 0xC0:
        kind = linux_autoconfig_16550a_variant(p) if full_probe else "16550A"
    else:
        kind = "unknown"
    p.outb(LCR, save_lcr)
    p.outb(MCR, save_mcr)
    p.outb(FCR, 0x01)  # serial8250_clear_fifos
    p.outb(FCR, 0x07)
    p.outb(FCR, 0x00)
    p.inb(RBR)
    p.outb(IER, 0)
    return kind


def linux_startup(p):
    """serial8250_do_startup for a port with an IRQ; returns the bugs it would flag."""
    p.outb(FCR, 0x01)
    p.outb(FCR, 0x07)
    p.outb(FCR, 0x00)
    for register in (LSR, RBR, IIR, MSR):
        p.inb(register)
    assert p.inb(LSR) != 0xFF, "LSR safety check"
    bugs = set()
    assert p.inb(LSR) & 0x20  # wait_for_xmitr(THRE)
    p.outb(IER, 0x02)
    iir1 = p.inb(IIR)
    p.outb(IER, 0)
    p.outb(IER, 0x02)
    iir = p.inb(IIR)
    p.outb(IER, 0)
    if not iir1 & 0x01 and iir & 0x01:
        bugs.add("UART_BUG_THRE")
    p.outb(LCR, 0x03)
    p.outb(MCR, 0x01 | 0x02 | 0x08)  # DTR | RTS | OUT2
    p.outb(IER, 0x02)
    lsr = p.inb(LSR)
    iir = p.inb(IIR)
    p.outb(IER, 0)
    if lsr & 0x40 and iir & 0x01:
        bugs.add("UART_BUG_TXEN")
    for register in (LSR, RBR, IIR, MSR):
        p.inb(register)
    return bugs


def linux_set_termios(p, ier, divisor=1):
    p.outb(IER, ier)
    p.outb(LCR, 0x83)
    p.outb(DLL, divisor & 0xFF)
    p.outb(DLM, divisor >> 8)
    p.outb(LCR, 0x03)
    p.outb(FCR, 0x01)
    p.outb(FCR, 0x81)  # 16550A: FIFO on, RX trigger 8
    p.outb(MCR, 0x0B)


class LinuxTty:
    """serial8250_handle_irq and its start/stop_tx, with an interrupt controller that
    latches edges and runs the handler, like the 8250 core's loop, until IIR is idle."""

    PASS_LIMIT = 512

    def __init__(self, p):
        self.p = p
        self.ier = 0x05  # RLSI | RDI, as startup leaves the shadow
        self.xmit = bytearray()
        self.received = bytearray()
        self.latched = False
        self.handler_runs = 0
        self.gave_up = 0
        p.uart._on_interrupt = self._edge
        linux_set_termios(p, self.ier)

    def _edge(self):
        self.latched = True

    def write(self, data):
        self.xmit += data
        if not self.ier & 0x02:
            self.ier |= 0x02
            self.p.outb(IER, self.ier)

    def handle_irq(self):
        iir = self.p.inb(IIR)
        if iir & 0x01:
            return False
        lsr = self.p.inb(LSR)
        count = 0
        while lsr & 0x01 and count < 256:
            self.received.append(self.p.inb(RBR))
            count += 1
            lsr = self.p.inb(LSR)
        self.p.inb(MSR)
        if lsr & 0x20 and self.ier & 0x02:
            chunk, self.xmit = self.xmit[:16], self.xmit[16:]
            for byte in chunk:
                self.p.outb(THR, byte)
            if not self.xmit:
                self.ier &= ~0x02
                self.p.outb(IER, self.ier)
        return True

    def interrupt(self, pass_limit=PASS_LIMIT):
        self.handler_runs += 1
        for _ in range(pass_limit):
            if not self.handle_irq():
                return
        self.gave_up += 1

    def deliver(self, pass_limit=PASS_LIMIT, max_runs=10_000):
        """Run the handler for every latched edge; returns when no edge is pending."""
        for _ in range(max_runs):
            if not self.latched:
                return
            self.latched = False
            self.interrupt(pass_limit)
        raise AssertionError("interrupt storm")
