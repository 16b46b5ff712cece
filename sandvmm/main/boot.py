"""The Linux x86 boot protocol: load a kernel and its initrd, fill boot_params, enter at 64 bits.

Two kinds of kernel file boot the same way:
- a bzImage: we skip its real-mode setup code and jump to the 64-bit entry point of its
  protected-mode part (startup_64, 0x200 in), which decompresses the kernel inside the guest;
- an uncompressed ELF vmlinux (what crosvm and Firecracker boot): its segments go straight to
  their physical addresses and we jump to its own startup_64, the ELF entry point. Nothing is
  decompressed in the guest; the default guest image keeps one, extracted when it is built.
The boot protocol allows both since 2.12 when the loader provides: long mode with an identity
map covering the kernel, boot_params and the command line; a GDT with flat __BOOT_CS/__BOOT_DS;
%rsi pointing at boot_params. Offsets below are those of Documentation/arch/x86/boot.rst and
zero-page.rst.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sandvmm.errors import UserError
from sandvmm.memory import GuestMemory, e820_map

# Where our boot structures live in low RAM (all below the EBDA, above the real-mode IVT).
GDT_ADDRESS = 0x500
BOOT_PARAMS_ADDRESS = 0x7000
PML4_ADDRESS = 0x9000  # then one PDPT page and four PD pages: 4 GiB in 2 MiB pages
CMDLINE_ADDRESS = 0x20000
ACPI_ADDRESS = 0xE0000  # in the BIOS area, where the kernel's RSDP scan also looks
KERNEL_ADDRESS = 0x1000000  # 16 MiB, the usual pref_address of x86-64 kernels

BOOT_CS, BOOT_DS = 0x10, 0x18
MIN_PROTOCOL = 0x020C  # 2.12: 64-bit entry point and xloadflags
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
PAGE = 4096
LOW_BOOT_AREA_END = 0x100000  # our boot structures and the BIOS area: no kernel segment below
# For a vmlinux, which has no setup header of its own: the values x86-64 kernels declare.
ELF_INITRD_ADDR_MAX = 0x7FFFFFFF
ELF_CMDLINE_SIZE = 2047  # COMMAND_LINE_SIZE - 1
ELF_MAGIC, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD = b"\x7fELF", 2, 1, 62, 1
ELF_HEADERS_READ = 64 * 1024  # the ELF header and program headers of any vmlinux fit


@dataclass(frozen=True)
class BzImage:
    setup_header: bytes  # from offset 0x1f1 to the header's end, copied into boot_params
    kernel: memoryview  # the protected-mode part (a view: it is copied once, into guest RAM)
    protocol: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    pref_address: int

    @property
    def payload(self) -> memoryview:
        """The compressed vmlinux inside (payload_offset/length, protocol 2.08)."""
        offset, length = struct.unpack_from("<II", self.setup_header, 0x248 - 0x1F1)
        return self.kernel[offset:offset + length]

    @property
    def end(self) -> int:
        """The top of what the kernel occupies at KERNEL_ADDRESS while it boots (init_size)."""
        return KERNEL_ADDRESS + max(self.init_size, len(self.kernel))

    @classmethod
    def parse(cls, data: bytes, path: str = "kernel") -> BzImage:
        def fail(why: str) -> UserError:
            return UserError(f"{path} is not a bootable x86-64 bzImage: {why}",
                             hint="pass a Linux bzImage (e.g. /boot/vmlinuz-*) or vmlinux with --kernel", status=2)

        if len(data) < 0x1000 or data[0x1FE:0x200] != b"\x55\xaa" or data[0x202:0x206] != b"HdrS":
            raise fail("no Linux boot header")
        protocol = struct.unpack_from("<H", data, 0x206)[0]
        if protocol < MIN_PROTOCOL:
            raise fail(f"boot protocol {protocol >> 8}.{protocol & 0xff} is older than 2.12")
        if not struct.unpack_from("<H", data, 0x236)[0] & XLF_KERNEL_64:
            raise fail("it has no 64-bit entry point")
        setup_sectors = data[0x1F1] or 4
        header_end = 0x202 + data[0x201]
        kernel = memoryview(data)[(setup_sectors + 1) * 512:]
        if not len(kernel):
            raise fail("it is truncated")
        return cls(
            setup_header=data[0x1F1:header_end],
            kernel=kernel,
            protocol=protocol,
            initrd_addr_max=struct.unpack_from("<I", data, 0x22C)[0],
            cmdline_size=struct.unpack_from("<I", data, 0x238)[0],
            init_size=struct.unpack_from("<I", data, 0x260)[0],
            pref_address=struct.unpack_from("<Q", data, 0x258)[0],
        )


@dataclass(frozen=True)
class Segment:
    address: int  # guest-physical (p_paddr)
    file_offset: int
    file_size: int
    memory_size: int  # past file_size: zeros, which fresh guest RAM already is


@dataclass(frozen=True)
class ElfKernel:
    path: Path
    entry: int
    segments: tuple[Segment, ...]
    initrd_addr_max: int = ELF_INITRD_ADDR_MAX
    cmdline_size: int = ELF_CMDLINE_SIZE

    @property
    def end(self) -> int:
        return max(segment.address + segment.memory_size for segment in self.segments)

    @classmethod
    def parse(cls, header: bytes, file_size: int, path: Path) -> ElfKernel:
        """From the file's first bytes (ELF header and program headers): checked, not yet loaded."""
        def fail(why: str) -> UserError:
            return UserError(f"{path} is not a bootable x86-64 vmlinux: {why}",
                             hint="pass a Linux bzImage or an uncompressed vmlinux with --kernel", status=2)

        if len(header) < 64 or header[4] != ELFCLASS64 or header[5] != ELFDATA2LSB:
            raise fail("not a 64-bit little-endian ELF file")
        machine, = struct.unpack_from("<H", header, 0x12)
        entry, table = struct.unpack_from("<QQ", header, 0x18)
        entry_size, count = struct.unpack_from("<HH", header, 0x36)
        if machine != EM_X86_64:
            raise fail(f"built for ELF machine {machine}, not x86-64")
        if entry_size < 56 or table + entry_size * count > len(header):
            raise fail("its program headers are missing or truncated")
        segments = []
        for index in range(count):
            kind, _, offset, _, address, size, memory_size = struct.unpack_from(
                "<IIQQQQQ", header, table + index * entry_size)
            if kind != PT_LOAD:
                continue
            if size > memory_size or offset + size > file_size or address < LOW_BOOT_AREA_END:
                raise fail(f"segment {index} lies outside the file or below 1 MiB")
            segments.append(Segment(address, offset, size, memory_size))
        if not any(s.address <= entry < s.address + s.memory_size for s in segments):
            raise fail(f"its entry point {entry:#x} is in no loadable segment")
        return cls(path, entry, tuple(segments))

    def load(self, memory: GuestMemory) -> None:
        """Each segment straight from the file into guest RAM."""
        try:
            with open(self.path, "rb", buffering=0) as file:
                for segment in self.segments:
                    file.seek(segment.file_offset)
                    if _read_fully(file, memory.slice(segment.address, segment.file_size)) != segment.file_size:
                        raise UserError(f"kernel {self.path} changed while it was read", status=2)
        except OSError as error:
            raise UserError(f"cannot read kernel {self.path}: {error.strerror}", status=2) from None


Kernel = BzImage | ElfKernel


def _read_fully(file, target: memoryview) -> int:
    """Read from file's position straight into target (guest RAM) until it is full or the
    file ends; how many bytes came."""
    done = 0
    while done < len(target) and (count := file.readinto(target[done:])):
        done += count
    return done


def read_kernel(path: Path) -> Kernel:
    try:
        with open(path, "rb") as file:
            head = file.read(ELF_HEADERS_READ)
            if head.startswith(ELF_MAGIC):
                return ElfKernel.parse(head, os.fstat(file.fileno()).st_size, path)
            data = head + file.read()
    except OSError as error:
        raise UserError(f"cannot read kernel {path}: {error.strerror}", status=2) from None
    return BzImage.parse(data, str(path))


def place_initrd(memory: GuestMemory, size: int, kernel_end: int, addr_max: int) -> int:
    """The highest page-aligned address that fits below both addr_max and the end of low RAM."""
    low_end = memory.regions[0].end
    top = min(addr_max + 1, low_end)
    address = (top - size) & ~(PAGE - 1)
    if address < kernel_end:
        raise UserError(f"the initrd ({size >> 20} MiB) does not fit in guest memory below "
                        f"{top >> 20} MiB", hint="give the guest more --mem", status=2)
    return address


def _read_initrd_into(memory: GuestMemory, path: Path, kernel_end: int, addr_max: int) -> tuple[int, int]:
    """Read the initrd file straight into guest RAM, as high as it may go; (address, size)."""
    try:
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            address = place_initrd(memory, size, kernel_end, addr_max)
            done = _read_fully(file, memory.slice(address, size))
    except OSError as error:
        raise UserError(f"cannot read initrd {path}: {error.strerror}", status=2) from None
    if done != size:
        raise UserError(f"initrd {path} changed while it was read", status=2)
    return address, size


def load_linux(memory: GuestMemory, image: Kernel, cmdline: str, initrd: Path | None,
               rsdp_address: int) -> int:
    """Put kernel, initrd, command line, boot_params and page tables in guest RAM.

    Returns the 64-bit entry point; the boot vCPU starts there with %rsi = BOOT_PARAMS_ADDRESS.
    """
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > min(image.cmdline_size + 1, BOOT_PARAMS_ADDRESS):
        raise UserError(f"the kernel command line is {len(encoded)} bytes; this kernel takes "
                        f"{image.cmdline_size}", status=2)
    kernel_end = image.end
    if kernel_end > memory.regions[0].end:
        raise UserError(f"the kernel needs {kernel_end >> 20} MiB of low memory", hint="give the guest more --mem", status=2)
    params = bytearray(PAGE)
    if isinstance(image, ElfKernel):
        image.load(memory)
        entry_point = image.entry
        # No setup header to copy: the fields a booting kernel reads from one.
        struct.pack_into("<H", params, 0x1FE, 0xAA55)
        params[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", params, 0x206, MIN_PROTOCOL)
        struct.pack_into("<I", params, 0x22C, image.initrd_addr_max)
        struct.pack_into("<I", params, 0x238, image.cmdline_size)
    else:
        memory.write(KERNEL_ADDRESS, image.kernel)
        entry_point = KERNEL_ADDRESS + 0x200
        params[0x1F1:0x1F1 + len(image.setup_header)] = image.setup_header
    memory.write(CMDLINE_ADDRESS, encoded)

    params[0x210] = 0xFF  # type_of_loader: "undefined", as the protocol asks of new loaders
    params[0x211] |= LOADED_HIGH
    struct.pack_into("<I", params, 0x228, CMDLINE_ADDRESS)
    struct.pack_into("<Q", params, 0x070, rsdp_address)
    if initrd is not None:
        struct.pack_into("<II", params, 0x218, *_read_initrd_into(memory, initrd, kernel_end, image.initrd_addr_max))
    entries = e820_map(memory.size)
    params[0x1E8] = len(entries)
    for index, entry in enumerate(entries):
        struct.pack_into("<QQI", params, 0x2D0 + 20 * index, *entry)
    memory.write(BOOT_PARAMS_ADDRESS, bytes(params))
    write_page_tables(memory)
    write_gdt(memory)
    return entry_point


def write_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages: all the entry code may touch."""
    present_writable, large = 0x3, 0x80
    pdpt = PML4_ADDRESS + PAGE
    memory.write(PML4_ADDRESS, struct.pack("<Q", pdpt | present_writable))
    for gib in range(4):
        directory = pdpt + PAGE * (gib + 1)
        memory.write(pdpt + 8 * gib, struct.pack("<Q", directory | present_writable))
        entries = [((gib << 30) + (index << 21)) | present_writable | large for index in range(512)]
        memory.write(directory, struct.pack("<512Q", *entries))


def write_gdt(memory: GuestMemory) -> None:
    # null, null, __BOOT_CS (64-bit code), __BOOT_DS (flat data)
    memory.write(GDT_ADDRESS, struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF))
