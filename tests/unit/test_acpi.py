"""The ACPI tables: layout and checksums by hand, well-formedness by ACPICA's own tools.

The iasl/acpiexec tests need Debian's acpica-tools and fail (not skip) without it: iasl
disassembling and re-assembling each table to the identical bytes, and acpiexec loading the
tables with the same FADT checks Linux runs, are the only proof that the AML and the
table layouts are what an ACPI OS expects.
"""

import re
import shutil
import struct
import subprocess

import pytest

from sandvmm.main import acpi, aml
from sandvmm.memory import PCI_WINDOW32, pci_window64

BASE = 0xE0000
ECAM = (0xB0000000, 0, 255)


def build(cpus=4, **kwargs):
    blob, rsdp = acpi.build_tables(acpi.AcpiConfig(cpus=cpus, **kwargs), BASE)
    return blob, rsdp


def table_at(blob, address):
    offset = address - BASE
    assert 0 <= offset <= len(blob) - acpi.HEADER_LENGTH, f"{address:#x} outside the blob"
    length = struct.unpack_from("<I", blob, offset + 4)[0]
    assert offset + length <= len(blob)
    return blob[offset : offset + length]


def walk(blob, rsdp):
    """Follow the pointers as an OS does: RSDP -> XSDT -> tables, FADT -> FACS and DSDT."""
    xsdt_address = struct.unpack_from("<Q", blob, rsdp - BASE + 24)[0]
    tables = {"RSDP": blob[rsdp - BASE : rsdp - BASE + 36], "XSDT": table_at(blob, xsdt_address)}
    addresses = {"RSDP": rsdp, "XSDT": xsdt_address}
    for (address,) in struct.iter_unpack("<Q", tables["XSDT"][36:]):
        table = table_at(blob, address)
        tables[table[:4].decode()], addresses[table[:4].decode()] = table, address
    fadt = tables["FACP"]
    addresses["FACS"] = struct.unpack_from("<I", fadt, 36)[0]
    addresses["DSDT"] = struct.unpack_from("<Q", fadt, 140)[0]
    tables["FACS"] = blob[addresses["FACS"] - BASE :][: acpi.FACS_LENGTH]
    tables["DSDT"] = table_at(blob, addresses["DSDT"])
    return tables, addresses


# --- Layout, checksums, pointers --------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 4, 255])
@pytest.mark.parametrize("ecam", [None, ECAM])
def test_every_table_checksums_to_zero_and_lengths_match(cpus, ecam):
    blob, rsdp = build(cpus, ecam=ecam)
    tables, addresses = walk(blob, rsdp)
    assert len(blob) < 0x4000
    for signature, table in tables.items():
        if signature == "RSDP":
            assert sum(table[:20]) % 256 == 0 and sum(table) % 256 == 0
            assert struct.unpack_from("<I", table, 20)[0] == len(table) == 36
        elif signature == "FACS":  # no checksum, but a length
            assert table[:4] == b"FACS" and struct.unpack_from("<I", table, 4)[0] == 64
        else:
            assert sum(table) % 256 == 0, signature
            assert struct.unpack_from("<I", table, 4)[0] == len(table)
            assert table[10:16] == b"SANDVM" and table[16:24] == b"SANDVMM "
        alignment = 64 if signature == "FACS" else 16
        assert addresses[signature] % alignment == 0, signature


def test_rsdp_is_found_by_a_bios_area_scan():
    """Linux scans 0xE0000-0xFFFFF on 16-byte boundaries for a checksummed "RSD PTR "."""
    blob, rsdp = build()
    found = [
        BASE + offset for offset in range(0, len(blob), 16)
        if blob[offset : offset + 8] == b"RSD PTR " and sum(blob[offset : offset + 20]) % 256 == 0
    ]
    assert found == [rsdp]
    assert blob[rsdp - BASE + 15] == 2  # revision: ACPI 2.0+, so the XSDT is used
    tables, _ = walk(blob, rsdp)
    assert tables["XSDT"][:4] == b"XSDT"


def test_xsdt_lists_fadt_and_madt_and_mcfg_only_with_ecam():
    listed = lambda tables: [t for t in tables if t not in ("RSDP", "XSDT", "FACS", "DSDT")]
    assert listed(walk(*build())[0]) == ["FACP", "APIC"]
    assert listed(walk(*build(ecam=ECAM))[0]) == ["FACP", "APIC", "MCFG"]
    assert b"MCFG" not in build()[0]


def test_fadt_fields_sit_at_their_spec_offsets():
    tables, addresses = walk(*build(pm_base=0x600, reset_port=0x608, sci_irq=9))
    fadt = tables["FACP"]
    field = lambda fmt, offset: struct.unpack_from("<" + fmt, fadt, offset)[0]
    assert len(fadt) == 276 and fadt[8] == 6
    assert field("I", 36) == addresses["FACS"] and field("Q", 132) == 0  # only one FACS pointer
    assert field("I", 40) == field("Q", 140) == addresses["DSDT"]
    assert field("H", 46) == 9  # SCI_INT
    assert field("I", 48) == 0  # SMI_CMD: always in ACPI mode
    assert field("I", 56) == 0x600 and field("I", 64) == 0x604  # PM1a_EVT_BLK, PM1a_CNT_BLK
    assert field("I", 76) == 0 and field("I", 80) == 0  # no PM timer, no GPE0
    assert fadt[88:92] == bytes([4, 2, 0, 0])  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    assert fadt[108] == 0x32  # CENTURY
    assert field("H", 109) & 0b11 == 0b11  # IAPC_BOOT_ARCH: LEGACY_DEVICES | 8042
    flags = field("I", 112)
    assert flags & acpi.FADT_RESET_REG_SUP and flags & acpi.FADT_WBINVD
    assert not flags & (1 << 20)  # not HW_REDUCED_ACPI
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, 0x608)  # RESET_REG: I/O byte
    assert fadt[128] == acpi.RESET_VALUE == 6
    assert fadt[148:160] == struct.pack("<BBBBQ", 1, 32, 0, 2, 0x600)  # X_PM1a_EVT_BLK
    assert fadt[172:184] == struct.pack("<BBBBQ", 1, 16, 0, 2, 0x604)  # X_PM1a_CNT_BLK


def madt_entries(madt):
    offset, entries = 44, []
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.mark.parametrize("cpus", [1, 3, 255])
def test_madt_has_one_enabled_lapic_per_cpu_then_ioapic_overrides_and_nmi(cpus):
    tables, _ = walk(*build(cpus))
    madt = tables["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, acpi.MADT_PCAT_COMPAT)
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for kind, e in entries if kind == 0]
    assert [(uid, apic_id) for _, _, uid, apic_id, _ in lapics] == [(i, i) for i in range(cpus)]
    assert all(flags & 1 for *_, flags in lapics)
    rest = [e for kind, e in entries if kind != 0]
    assert rest[0] == struct.pack("<BBBBII", 1, 12, acpi.IOAPIC_ID, 0, 0xFEC00000, 0)
    assert rest[1] == struct.pack("<BBBBIH", 2, 10, 0, 0, 0, 0x5)  # IRQ0 -> GSI0 (KVM's PIT), edge/high
    assert rest[2] == struct.pack("<BBBBIH", 2, 10, 0, 9, 9, 0xD)  # SCI: level/high
    assert rest[3] == struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # NMI on LINT1, all CPUs
    assert len(rest) == 4


def test_mcfg_describes_the_ecam_window():
    tables, _ = walk(*build(ecam=(0xB0000000, 0, 63)))
    assert struct.unpack_from("<QHBBI", tables["MCFG"], 44) == (0xB0000000, 0, 0, 63, 0)
    assert len(tables["MCFG"]) == 60


def test_dsdt_holds_s5_then_the_extra_aml():
    extra = aml.name("FOO", 0x1234)
    dsdt = walk(*build(dsdt_extra=extra))[0]["DSDT"]
    s5 = aml.name("_S5", aml.package(5, 5, 0, 0))
    assert s5 == b"\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    assert dsdt[36:] == s5 + extra


def test_pm_register_constants_agree_with_the_spec():
    assert acpi.SLP_TYP_S5 << acpi.SLP_TYP_SHIFT | acpi.SLP_EN == 0x3400
    assert acpi.SLP_TYP_MASK == 0x1C00 and acpi.SCI_EN == 1 and acpi.PM1_PWRBTN == 0x100


@pytest.mark.parametrize("bad", [dict(cpus=0), dict(cpus=256), dict(sci_irq=2), dict(sci_irq=16),
                                 dict(ecam=(0xB0000000, 5, 4)), dict(ecam=(0xB0001000, 0, 1))])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        acpi.AcpiConfig(**{"cpus": 1} | bad)


def test_tables_can_start_at_an_unaligned_base():
    blob, rsdp = acpi.build_tables(acpi.AcpiConfig(cpus=2), 0xE0008)
    assert rsdp % 16 == 0 and blob[rsdp - 0xE0008 :].startswith(b"RSD PTR ")


# --- AML encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("body, encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"),  # 63 + 2 = 65 = 0x41: nibble 1, then 0x04
    (0xFFD, b"\x4f\xff"), (0xFFE, b"\x81\x00\x01"), (0xFFFFC, b"\x8f\xff\xff"),
    (0xFFFFD, b"\xc1\x00\x00\x01"),
])
def test_pkg_length_counts_its_own_bytes(body, encoded):
    assert aml.pkg_length(body) == encoded


def test_name_strings_and_integers():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("^^A.B.C") == b"^^\x2f\x03A___B___C___"
    assert aml.name_string("\\") == b"\\\x00"
    assert [aml.integer(v) for v in (0, 1, 2, 0x100, 0x10000, 1 << 32, (1 << 64) - 1)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x00\x01", b"\x0c\x00\x00\x01\x00",
        b"\x0e" + (1 << 32).to_bytes(8, "little"), b"\xff"]
    assert aml.eisa_id("PNP0A08") == b"\x0c\x41\xd0\x0a\x08"
    for bad in ("1ABC", "TOOLONG", "a-b"):
        with pytest.raises(ValueError):
            aml.name_seg(bad)


# --- ACPICA tools ---------------------------------------------------------------------


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's acpica-tools (apt-get install "
                    "acpica-tools)")
    return path


def run(args, cwd):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    # "Firmware Warning (ACPI): ...", "Error 6126 - ...", but not "0 Errors, 0 Warnings".
    assert not re.search(r"\b(Warning|Error)\b", text), text
    return text


def pci_host_bridge():
    """The real host bridge, plus a device using the AML helpers the bridge does not."""
    bridge = acpi.pci_host_bridge(PCI_WINDOW32, pci_window64(5 << 30), {slot: 16 + slot % 8 for slot in range(1, 32)})
    return bridge + aml.scope("\\_SB", aml.device("TEST",
        aml.name("_HID", "SVMM0001"),
        aml.method("_STA", aml.return_(0x0F)),
        aml.method("_DSM", aml.return_(aml.buffer(b"\x00")), args=4, serialized=True),
        aml.method("\\_SB.TEST.BIG_", aml.return_(0x123456789)),
    ))


@pytest.mark.parametrize("extra", [b"", pci_host_bridge()], ids=["plain", "pci"])
def test_iasl_disassembles_and_reassembles_every_table_identically(tmp_path, extra):
    iasl = tool("iasl")
    tables, addresses = walk(*build(ecam=ECAM, dsdt_extra=extra))
    for signature, table in tables.items():
        if signature == "RSDP":
            continue  # iasl -d cannot read a bare RSDP; checked by the next test
        name = signature.lower()
        (tmp_path / f"{name}.dat").write_bytes(table)
        run([iasl, "-d", f"{name}.dat"], tmp_path)
        # -on: keep name paths as written so the AML compares byte for byte.
        run([iasl, "-on", "-p", f"{name}-again", f"{name}.dsl"], tmp_path)
        again = (tmp_path / f"{name}-again.aml").read_bytes()
        if signature == "FACS":
            assert again == table
        else:  # iasl stamps its own creator id and revision, hence its own checksum
            assert again[:9] + again[10:28] + again[36:] == table[:9] + table[10:28] + table[36:]
    dsl = (tmp_path / "dsdt.dsl").read_text()
    s5 = r"Name \(_S5, Package \(0x04\).*?\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}"
    assert re.search(s5, dsl, re.S)
    if extra:
        assert 'EisaId ("PNP0A08")' in dsl and "QWordMemory (ResourceProducer" in dsl


def test_iasl_compiles_an_rsdp_identical_to_ours(tmp_path):
    iasl = tool("iasl")
    blob, rsdp_address = build()
    rsdp = blob[rsdp_address - BASE :][:36]
    xsdt = struct.unpack_from("<Q", rsdp, 24)[0]
    (tmp_path / "rsdp.asl").write_text(
        '[0008] Signature : "RSD PTR "\n[0001] Checksum : 00\n[0006] Oem ID : "SANDVM"\n'
        "[0001] Revision : 02\n[0004] RSDT Address : 00000000\n[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {xsdt:016X}\n[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n"
    )
    run([iasl, "rsdp.asl"], tmp_path)  # iasl fills in both checksums itself
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


def test_acpiexec_loads_the_tables_as_linux_would_and_evaluates_s5(tmp_path):
    """acpiexec runs ACPICA's FADT parsing (the same code as Linux's) and the interpreter."""
    acpiexec = tool("acpiexec")
    tables, _ = walk(*build(ecam=ECAM, dsdt_extra=pci_host_bridge()))
    files = []
    for signature in ("FACP", "DSDT", "APIC", "MCFG"):
        files.append(f"{signature.lower()}.dat")
        (tmp_path / files[-1]).write_bytes(tables[signature])
    out = subprocess.run([acpiexec, "-b", "evaluate \\_S5; evaluate \\_SB.PCI0._CRS; evaluate \\_SB.PCI0._PRT", *files],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    # acpiexec's built-in self-tests poke GPEs, the PM timer and PM2 (ARB_DIS), none of which
    # this platform has; they report "Unexpected ..." lines that are not about our tables.
    assert not re.search(r"\b(Warning|Error|mismatch)\b", text, re.I), text
    s5 = text.split("Evaluation of \\_S5", 1)[1]
    values = [int(v, 16) for v in re.findall(r"\[Integer\] = ([0-9A-F]+)", s5)[:4]]
    assert values == [5, 5, 0, 0]
    assert "Evaluation of \\_SB.PCI0._CRS returned" in text
    prt = text.split("Evaluation of \\_SB.PCI0._PRT", 1)[1]
    assert "[Package] Contains 31 Elements" in prt, prt[:400]
