"""The ACPI tables a direct-booted x86-64 Linux guest reads at boot.

`build_tables` lays out RSDP, XSDT, FADT, FACS, DSDT, MADT and (optionally) MCFG
contiguously at a guest-physical address. Together they tell the kernel: how many vCPUs
exist (MADT), how ISA interrupts reach the IOAPIC, and where the VMM's emulated ACPI PM
registers live so that `poweroff` (SLP_TYP 5 + SLP_EN into PM1a_CNT) and `reboot`
(RESET_VALUE into the reset port) reach the VMM.

The platform is classic (not hardware-reduced) ACPI because the VMM emulates legacy
devices (CMOS RTC, i8042, PIT) that the kernel only probes on a legacy platform. Field
offsets follow ACPI 6.5, chapter 5. The constants below are shared with the PM device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sandvmm.main import aml

# --- Registers of the emulated PM device -------------------------------------------
PM1_EVT_LEN = 4  # PM1a_EVT_BLK: PM1_STS (u16) then PM1_EN (u16)
PM1_CNT_LEN = 2  # PM1a_CNT_BLK: PM1_CNT (u16)
# PM1_STS / PM1_EN bits (same position in both). Status bits are write-1-to-clear.
PM1_PWRBTN = 1 << 8  # fixed-feature power button: the VMM's graceful-shutdown request
PM1_RTC = 1 << 10  # Linux's rtc-cmos may clear/disable it even though FIX_RTC is set
PM1_WAK = 1 << 15  # PM1_STS only; Linux clears it before entering a sleep state
# PM1_CNT bits.
SCI_EN = 1 << 0  # reads as 1: the platform is always in ACPI mode (SMI_CMD = 0)
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
SLP_TYP_S5 = 5  # the value \_S5 tells the guest to write; the PM device powers off on it
RESET_VALUE = 0x06  # written to the 1-byte reset port; same value as the 0xCF9 convention

# --- Table identity ------------------------------------------------------------------
OEM_ID = b"SANDVM"
OEM_TABLE_ID = b"SANDVMM "
OEM_REVISION = 1
CREATOR_ID = b"SVMM"
CREATOR_REVISION = 1
HEADER_LENGTH = 36
FADT_LENGTH = 276  # FADT revision 6 (ACPI 6.0+)
FACS_LENGTH = 64
RSDP_LENGTH = 36

# FADT Flags (ACPI 6.5 table 5.10).
FADT_WBINVD = 1 << 0  # required for any ACPI 2.0+ x86 platform; WBINVD works under KVM
FADT_PROC_C1 = 1 << 2  # C1 = HLT, which KVM handles; no deeper C-states are offered
FADT_SLP_BUTTON = 1 << 5  # set = *no* fixed-feature sleep button (we have no sleep states)
FADT_FIX_RTC = 1 << 6  # set = no RTC wake status in PM1 (the CMOS RTC cannot wake us)
FADT_RESET_REG_SUP = 1 << 10
# PWR_BUTTON (bit 4) is deliberately clear: a clear bit means a fixed-feature power button
# exists, so the VMM can request a clean shutdown by setting PM1_PWRBTN and raising SCI.
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP

# FADT IAPC_BOOT_ARCH: LEGACY_DEVICES (ISA devices such as the RTC exist), 8042 (so the
# i8042 driver probes the ports even without a PNP0303 device in the DSDT), VGA not present
# (we emulate none, so the kernel must not poke VGA registers).
IAPC_LEGACY_DEVICES, IAPC_8042, IAPC_VGA_NOT_PRESENT = 1 << 0, 1 << 1, 1 << 2
IAPC_BOOT_ARCH = IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT
CMOS_CENTURY_REGISTER = 0x32

# FADT latencies above these limits mean "C2/C3 not supported".
C2_UNSUPPORTED_LATENCY, C3_UNSUPPORTED_LATENCY = 101, 1001

# Generic Address Structure address space ids and access sizes.
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD = 1, 2

# MADT.
MADT_PCAT_COMPAT = 1 << 0  # KVM's irqchip has the dual 8259s too; Linux masks them for the IOAPIC
MADT_LAPIC, MADT_IOAPIC, MADT_INTERRUPT_OVERRIDE, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
# MPS INTI flags: polarity in bits 1-0 (1 = active high), trigger mode in bits 3-2.
INTI_ACTIVE_HIGH, INTI_EDGE, INTI_LEVEL = 0x1, 0x1 << 2, 0x3 << 2
# The ID KVM's in-kernel IOAPIC resets to (its ID register holds only 4 bits, so an ID
# past 15 could not even be read back); 64-bit Linux accepts it as given. I/O APIC IDs
# need not differ from local APIC IDs since xAPIC replaced the shared serial APIC bus.
IOAPIC_ID = 0
# KVM's in-kernel PIT raises GSI 0, and KVM's default routing sends GSI n to IOAPIC pin n:
# so, unlike a PC (and QEMU, which reroutes GSI 0 to pin 2), the PIT is on pin 0 here.
# Claiming pin 2 leaves Linux without a timer tick (jiffies stand still).
PIT_ISA_IRQ, PIT_GSI = 0, 0
ALL_PROCESSORS = 0xFF
LINT1 = 1


@dataclass(frozen=True)
class AcpiConfig:
    cpus: int  # APIC IDs and ACPI processor UIDs are 0..cpus-1
    pm_base: int = 0x600  # PM1a_EVT_BLK at pm_base, PM1a_CNT_BLK at pm_base + 4
    reset_port: int = 0x608
    sci_irq: int = 9
    ioapic_address: int = 0xFEC00000
    lapic_address: int = 0xFEE00000
    ecam: tuple[int, int, int] | None = None  # (base address, first bus, last bus) -> MCFG
    dsdt_extra: bytes = b""  # AML appended to the DSDT's root scope

    def __post_init__(self) -> None:
        # xAPIC IDs are 8-bit and 0xFF is the broadcast ID; more CPUs would need x2APIC entries.
        if not 1 <= self.cpus <= 255:
            raise ValueError(f"cpus must be 1..255, got {self.cpus}")
        if not 2 < self.sci_irq < 16:
            raise ValueError(f"sci_irq must be an ISA IRQ other than 0 and 2, got {self.sci_irq}")
        pm_end = self.pm_base + PM1_EVT_LEN + PM1_CNT_LEN
        if not 0 < self.pm_base < pm_end <= 0x10000 or not 0 < self.reset_port <= 0xFFFF:
            raise ValueError("PM and reset ports must be 16-bit I/O ports")
        if self.ecam is not None:
            base, first, last = self.ecam
            if not 0 <= first <= last <= 0xFF or base % (1 << 20):
                raise ValueError(f"bad ECAM window {self.ecam}: buses 0..255, 1 MiB-aligned base")


def checksum(data: bytes) -> int:
    """The byte that makes data (with a zero checksum byte) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _set_checksum(data: bytearray, offset: int, length: int | None = None) -> bytes:
    data[offset] = 0
    data[offset] = checksum(data[: length if length is not None else len(data)])
    return bytes(data)


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, HEADER_LENGTH + len(body), revision, 0,
        OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )
    return _set_checksum(bytearray(header + body), 9)


def _gas(space_id: int, bit_width: int, access_size: int, address: int) -> bytes:
    return struct.pack("<BBBBQ", space_id, bit_width, 0, access_size, address)


def build_dsdt(config: AcpiConfig) -> bytes:
    # _S5: SLP_TYPa, SLP_TYPb, two reserved values. Linux's poweroff writes SLP_TYPa with
    # SLP_EN into PM1a_CNT; without \_S5 it does not register ACPI power-off at all.
    sleep_s5 = aml.name("_S5", aml.package(SLP_TYP_S5, SLP_TYP_S5, 0, 0))
    # Revision 2: AML integers are 64-bit (revision 1 truncates them to 32 bits).
    return _table(b"DSDT", 2, sleep_s5 + config.dsdt_extra)


def build_facs() -> bytes:
    # No checksum; the waking vectors and global lock stay 0 (no S1-S4, no firmware lock).
    facs = struct.pack("<4sIIIII", b"FACS", FACS_LENGTH, 0, 0, 0, 0)
    facs += struct.pack("<QB", 0, 2)  # X waking vector, version 2
    return facs.ljust(FACS_LENGTH, b"\x00")


def build_fadt(config: AcpiConfig, dsdt_address: int, facs_address: int) -> bytes:
    fadt = bytearray(FADT_LENGTH)  # offsets below are from the table start, header included

    def put(fmt: str, offset: int, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, fadt, offset, *values)

    # The spec allows at most one of FIRMWARE_CTRL / X_FIRMWARE_CTRL to be non-zero (fwts
    # fails tables that set both), so use the 32-bit field whenever the FACS is below 4 GiB.
    if facs_address < 1 << 32:
        put("I", 36, facs_address)
    else:
        put("Q", 132, facs_address)
    put("I", 40, dsdt_address if dsdt_address < 1 << 32 else 0)
    put("Q", 140, dsdt_address)  # X_DSDT; an equal DSDT value is allowed and ignored
    put("H", 46, config.sci_irq)
    # SMI_CMD (48) = 0 with ACPI_ENABLE/ACPI_DISABLE (52, 53) = 0: always in ACPI mode.
    pm1_cnt = config.pm_base + PM1_EVT_LEN
    put("I", 56, config.pm_base)  # PM1a_EVT_BLK
    put("I", 64, pm1_cnt)  # PM1a_CNT_BLK
    # PM_TMR_BLK (76) and GPE0/1 (80, 84) stay 0: no PM timer, no GPE blocks.
    put("BB", 88, PM1_EVT_LEN, PM1_CNT_LEN)
    put("HH", 96, C2_UNSUPPORTED_LATENCY, C3_UNSUPPORTED_LATENCY)
    put("B", 108, CMOS_CENTURY_REGISTER)
    put("H", 109, IAPC_BOOT_ARCH)
    put("I", 112, FADT_FLAGS)
    put("12s", 116, _gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, config.reset_port))  # RESET_REG
    put("B", 128, RESET_VALUE)
    put("B", 131, 5)  # FADT minor version: ACPI 6.5
    # The X_ blocks must agree with the 32-bit ones: ACPICA checks bit_width == 8 * length.
    put("12s", 148, _gas(GAS_SYSTEM_IO, 8 * PM1_EVT_LEN, GAS_ACCESS_WORD, config.pm_base))
    put("12s", 172, _gas(GAS_SYSTEM_IO, 8 * PM1_CNT_LEN, GAS_ACCESS_WORD, pm1_cnt))
    return _table(b"FACP", 6, bytes(fadt[HEADER_LENGTH:]))


def build_madt(config: AcpiConfig) -> bytes:
    body = struct.pack("<II", config.lapic_address, MADT_PCAT_COMPAT)
    for apic_id in range(config.cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, apic_id, apic_id, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, config.ioapic_address, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, PIT_ISA_IRQ, PIT_GSI,
                        INTI_ACTIVE_HIGH | INTI_EDGE)
    # Without an override Linux treats the SCI as level/active-low (the ACPI default). The
    # VMM asserts it by driving the line to 1 (KVM_IRQ_LINE level 1), i.e. active-high, so
    # say so. It stays level-triggered: the PM device holds the line while any enabled
    # PM1 status bit is set and drops it when the guest clears them.
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, config.sci_irq, config.sci_irq,
                        INTI_ACTIVE_HIGH | INTI_LEVEL)
    # LINT1 of every local APIC carries NMI (flags 0: conforms to the bus, i.e. edge/high).
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, LINT1)
    # Revision 5 (ACPI 6.3); the entry types used here have not changed since ACPI 1.0.
    return _table(b"APIC", 5, body)


def build_mcfg(ecam: tuple[int, int, int]) -> bytes:
    base, first_bus, last_bus = ecam
    allocation = struct.pack("<QHBBI", base, 0, first_bus, last_bus, 0)
    return _table(b"MCFG", 1, bytes(8) + allocation)  # 8 reserved bytes precede the entries


def build_xsdt(table_addresses: list[int]) -> bytes:
    return _table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addresses))


def build_rsdp(xsdt_address: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_LENGTH,
                                 xsdt_address, 0))
    _set_checksum(rsdp, 8, 20)  # ACPI 1.0 checksum covers the first 20 bytes
    return _set_checksum(rsdp, 32)  # the extended checksum covers all 36


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def build_tables(config: AcpiConfig, base_address: int) -> tuple[bytes, int]:
    """All tables laid out contiguously from base_address (guest-physical).

    Returns (blob, rsdp_address). Alignments are of guest-physical addresses: the RSDP on
    16 bytes (the kernel's BIOS-area scan steps by 16), the FACS on 64 (the spec requires
    it), everything else on 16.
    """
    sized = {"DSDT": build_dsdt(config), "APIC": build_madt(config)}
    if config.ecam is not None:
        sized["MCFG"] = build_mcfg(config.ecam)
    system_tables = ["FACP", "APIC"] + (["MCFG"] if config.ecam is not None else [])
    lengths = {"RSDP": RSDP_LENGTH, "XSDT": HEADER_LENGTH + 8 * len(system_tables),
               "FACP": FADT_LENGTH, "FACS": FACS_LENGTH} | {k: len(v) for k, v in sized.items()}

    addresses: dict[str, int] = {}
    cursor = base_address
    for key in ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "MCFG"]:
        if key in lengths:
            addresses[key] = _align(cursor, 64 if key == "FACS" else 16)
            cursor = addresses[key] + lengths[key]

    tables = sized | {
        "RSDP": build_rsdp(addresses["XSDT"]),
        "XSDT": build_xsdt([addresses[k] for k in system_tables]),
        "FACP": build_fadt(config, addresses["DSDT"], addresses["FACS"]),
        "FACS": build_facs(),
    }
    blob = bytearray(cursor - base_address)
    for key, data in tables.items():
        assert len(data) == lengths[key], key
        offset = addresses[key] - base_address
        blob[offset : offset + len(data)] = data
    return bytes(blob), addresses["RSDP"]


def pvpanic_device(port: int) -> bytes:
    """DSDT AML for a pvpanic device: Linux's pvpanic driver binds to _HID QEMU0001 and
    writes 1 to its I/O port when the kernel panics, so the VMM learns of a panic directly."""
    return aml.scope("\\_SB", aml.device("PEVT", aml.name("_HID", "QEMU0001"),
                                          aml.name("_CRS", aml.resource_template(aml.io_port(port, 1)))))


def pci_host_bridge(window32: tuple[int, int], window64: tuple[int, int], intx_gsi: dict[int, int]) -> bytes:
    """DSDT AML for the PCIe host bridge of bus 0.

    _CRS lists the windows the bridge forwards: Linux only keeps firmware-assigned BARs that
    lie inside them. _PRT maps each slot's INTA to an IOAPIC pin directly (source 0 = a GSI,
    no link device); Linux then programs those pins level-triggered, which is what the
    devices' resampling irqfds expect.
    """
    (base32, size32), (base64, size64) = window32, window64
    resources = aml.resource_template(
        aml.word_bus_number(0, 0),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(base32, base32 + size32 - 1),
        aml.qword_memory(base64, base64 + size64 - 1),
    )
    routing = aml.package(*(aml.package(slot << 16 | 0xFFFF, 0, 0, gsi) for slot, gsi in sorted(intx_gsi.items())))
    return aml.scope("\\_SB", aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),  # PCI Express root bridge
        aml.name("_CID", aml.eisa_id("PNP0A03")),  # compatible: PCI root bridge
        aml.name("_SEG", 0),
        aml.name("_BBN", 0),
        aml.name("_UID", 0),
        aml.name("_CRS", resources),
        aml.name("_PRT", routing),
    ))
