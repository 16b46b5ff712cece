"""Legacy PC devices for the port-I/O bus, sans-I/O.

Each device talks to the rest of the VMM only through callbacks given to its
constructor, guards its state with its own lock (several vCPU threads may call it at
once), and turns any guest access, whatever its offset, size or value, into something
sensible rather than an exception.

Where a PC has them, and so where the VMM registers them:

    Serial              0x3F8, length 8   COM1; IRQ 4, injected as an edge
    I8042.data_port     0x60,  length 1   (0x61-0x63 belong to other devices)
    I8042.command_port  0x64,  length 1
    Rtc                 0x70,  length 2   IRQ 8 is never raised
    PowerManagement     0x600, length 16  described by the FADT; SCI is a level
"""

from sandvmm.main.legacy.i8042 import I8042
from sandvmm.main.legacy.pm import PowerManagement
from sandvmm.main.legacy.rtc import Rtc
from sandvmm.main.legacy.serial import Serial

__all__ = ["I8042", "PowerManagement", "Rtc", "Serial"]
