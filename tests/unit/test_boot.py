"""Pure parts of booting: the e820 map, bzImage parsing and placement, CPUID topology, console filter."""

import struct

import pytest

from sandvmm.errors import UserError
from sandvmm.image.build import ensure_image
from sandvmm.main import kvm
from sandvmm.main.boot import BOOT_PARAMS_ADDRESS, BzImage, ElfKernel, load_linux, read_kernel
from sandvmm.main.cpu import vcpu_cpuid
from sandvmm.memory import ECAM_BASE, ECAM_SIZE, GiB, MiB, GuestMemory, GuestMemoryError, e820_map
from sandvmm.main.run import MarkerFilter


def test_e820_splits_ram_around_the_mmio_hole():
    entries = e820_map(5 * GiB)
    ram = sum(length for _, length, kind in entries if kind == 1)
    assert ram == 5 * GiB - (0x100000 - 0x9FC00)
    assert (4 * GiB, 2 * GiB, 1) in entries
    assert all(not (3 * GiB <= address < 4 * GiB) for address, _, kind in entries if kind == 1)
    # Linux uses the MCFG's ECAM window only if firmware reserved it.
    assert (ECAM_BASE, ECAM_SIZE, 2) in entries
    assert [address for address, _, _ in entries] == sorted(address for address, _, _ in entries)


def test_guest_memory_refuses_ranges_outside_ram():
    memory = GuestMemory(256 * MiB)
    try:
        memory.write(0x1000, b"abc")
        assert memory.read(0x1000, 3) == b"abc"
        with pytest.raises(GuestMemoryError):
            memory.read(256 * MiB - 1, 2)
        with pytest.raises(GuestMemoryError):
            memory.read(3 * GiB, 1)
    finally:
        memory.close()


def test_the_default_kernel_loads_with_boot_params_filled_in(tmp_path):
    image = ensure_image()
    kernel = read_kernel(image.kernel)
    assert kernel.protocol >= 0x020C
    memory = GuestMemory(512 * MiB)
    try:
        initrd = bytes(range(256)) * 4096 + b"end"
        (tmp_path / "initrd").write_bytes(initrd)
        entry = load_linux(memory, kernel, "console=ttyS0", tmp_path / "initrd", rsdp_address=0xE0000)
        params = memory.read(BOOT_PARAMS_ADDRESS, 4096)
        ramdisk_image, ramdisk_size = struct.unpack_from("<II", params, 0x218)
        assert ramdisk_size == len(initrd) and memory.read(ramdisk_image, len(initrd)) == initrd
        assert ramdisk_image % 4096 == 0
        assert ramdisk_image + ramdisk_size <= min(kernel.initrd_addr_max + 1, 512 * MiB)
        assert params[0x1E8] == len(e820_map(512 * MiB))
        assert struct.unpack_from("<Q", params, 0x070)[0] == 0xE0000
        assert entry == 0x1000000 + 0x200
        assert memory.read(0x1000000, 64) == kernel.kernel[:64]
    finally:
        memory.close()


def test_an_initrd_that_does_not_fit_or_cannot_be_read_is_a_usage_error(tmp_path):
    kernel = read_kernel(ensure_image().kernel)
    memory = GuestMemory(128 * MiB)
    try:
        big = tmp_path / "big"
        with open(big, "wb") as file:
            file.truncate(120 * MiB)
        with pytest.raises(UserError, match="does not fit") as error:
            load_linux(memory, kernel, "", big, rsdp_address=0xE0000)
        assert error.value.status == 2
        with pytest.raises(UserError, match="cannot read initrd") as error:
            load_linux(memory, kernel, "", tmp_path, rsdp_address=0xE0000)  # a directory
        assert error.value.status == 2
    finally:
        memory.close()


def test_a_truncated_bzimage_is_refused():
    image = ensure_image()
    data = image.kernel.read_bytes()
    with pytest.raises(UserError, match="not a bootable"):
        BzImage.parse(data[:0x300], "k")


def test_cpuid_topology_is_consistent_per_vcpu():
    supported = kvm.Kvm().supported_cpuid()
    for vcpu in range(3):
        leaves = {(e.function, e.index): e for e in vcpu_cpuid(supported, vcpu, 3)}
        assert leaves[(1, 0)].ebx >> 24 == vcpu
        assert leaves[(1, 0)].ecx & (1 << 31)  # hypervisor bit
        if (0xB, 1) in leaves:
            assert leaves[(0xB, 1)].ebx == 3 and leaves[(0xB, 0)].edx == vcpu
        if (0x80000008, 0) in leaves:
            assert leaves[(0x80000008, 0)].ecx & 0xFF == 2


def test_marker_filter_drops_only_protocol_lines():
    out = []
    console = MarkerFilter(out.append)
    for chunk in (b"sandvmm-init: re", b"ady\r\nhel", b"lo\r\nsandvmm-i", b"nit: exit 0\r\n", b"sandbox\r\n"):
        console.feed(chunk)
    assert b"".join(out) == b"hello\r\nsandbox\r\n"


def test_the_default_vmlinux_loads_segment_by_segment_with_a_setup_header_made_up(tmp_path):
    image = ensure_image()
    kernel = read_kernel(image.vmlinux)
    assert isinstance(kernel, ElfKernel) and kernel.segments
    memory = GuestMemory(512 * MiB)
    try:
        (tmp_path / "initrd").write_bytes(b"initrd")
        entry = load_linux(memory, kernel, "console=ttyS0 quiet", tmp_path / "initrd", rsdp_address=0xE0000)
        assert entry == kernel.entry == struct.unpack_from("<Q", image.vmlinux.read_bytes(), 0x18)[0]
        data = image.vmlinux.read_bytes()
        for segment in kernel.segments:
            loaded = memory.read(segment.address, segment.file_size)
            assert loaded == data[segment.file_offset:segment.file_offset + segment.file_size]
        params = memory.read(BOOT_PARAMS_ADDRESS, 4096)
        assert params[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", params, 0x1FE)[0] == 0xAA55
        assert memory.read(struct.unpack_from("<I", params, 0x228)[0], 20) == b"console=ttyS0 quiet\0"
        ramdisk_image, ramdisk_size = struct.unpack_from("<II", params, 0x218)
        assert ramdisk_size == 6 and memory.read(ramdisk_image, 6) == b"initrd" and ramdisk_image >= kernel.end
    finally:
        memory.close()


def elf_header(machine=62, entry=0x1000000, segments=((1, 0x1000, 0x1000000, 0x100, 0x200),), elf_class=2):
    """A minimal ELF header plus program headers (type, offset, paddr, filesz, memsz)."""
    header = bytearray(0x40 + 56 * len(segments))
    header[:6] = b"\x7fELF" + bytes([elf_class, 1])
    struct.pack_into("<HHIQQ", header, 0x10, 2, machine, 1, entry, 0x40)
    struct.pack_into("<HH", header, 0x36, 56, len(segments))
    for index, (kind, offset, address, size, memory_size) in enumerate(segments):
        struct.pack_into("<IIQQQQQQ", header, 0x40 + 56 * index, kind, 5, offset, address, address,
                         size, memory_size, 0x1000)
    return bytes(header).ljust(0x2000, b"\0")  # the segments' bytes: zeros


@pytest.mark.parametrize("header, why", [
    (elf_header(elf_class=1), "64-bit"),
    (elf_header(machine=183), "machine 183"),
    (elf_header()[:0x50], "truncated"),  # the file ends inside the program headers
    (elf_header(segments=((1, 0x1000, 0x1000000, 0x100000, 0x100000),)), "outside the file"),
    (elf_header(segments=((1, 0x1000, 0x1000000, 0x300, 0x200),)), "outside the file"),
    (elf_header(entry=0x7000, segments=((1, 0x1000, 0x7000, 0x100, 0x100),)), "below 1 MiB"),
    (elf_header(entry=0x2000000), "no loadable segment"),
    (elf_header(segments=((4, 0x1000, 0x1000000, 0x100, 0x100),)), "no loadable segment"),
])
def test_a_vmlinux_that_cannot_boot_is_a_usage_error(tmp_path, header, why):
    path = tmp_path / "vmlinux"
    path.write_bytes(header)
    with pytest.raises(UserError, match="not a bootable x86-64 vmlinux") as error:
        read_kernel(path)
    assert why in str(error.value) and error.value.status == 2


def test_a_well_formed_small_vmlinux_is_accepted(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_header())
    kernel = read_kernel(path)
    assert kernel.entry == 0x1000000 and kernel.end == 0x1000200
