"""The qcow2 on-disk format: header parsing and checking, and creating a new image.

Written from the format's specification (QEMU's docs/interop/qcow2.txt). Every number is
big-endian. What this layer refuses, and why, is in docs/devices/block-images.md.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sandvmm.devices.block.disk import QCOW2_MAGIC, ImageError

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
HEADER_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount_order, header_length
V3_HEADER_LENGTH = HEADER_V2.size + HEADER_V3.size  # 104

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # 512 B .. 2 MiB
MAX_L1_BYTES = 32 << 20  # QEMU's limits: an image outside them is one QEMU would not open either
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1, L2 and refcount table entries
COPIED = 1 << 63  # refcount is exactly one: the entry may be written in place
COMPRESSED = 1 << 62
ZERO = 1  # v3: the cluster reads as zeros

INCOMPATIBLE_DIRTY = 1 << 0
INCOMPATIBLE_CORRUPT = 1 << 1
INCOMPATIBLE_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                      4: "extended L2 entries"}
INCOMPATIBLE_UNSUPPORTED = {2, 3, 4}  # handled above dirty/corrupt: each has its own message

EXTENSION_END = 0
EXTENSION_BACKING_FORMAT = 0xE2792ACA
EXTENSION_FEATURE_NAMES = 0x6803F857
EXTENSION_BITMAPS = 0x23852875
EXTENSION_EXTERNAL_DATA = 0x44415441
EXTENSION = struct.Struct(">II")
FEATURE_NAME = struct.Struct(">BB46s")


@dataclass
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2.size
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & INCOMPATIBLE_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPATIBLE_CORRUPT)


def is_qcow2(head: bytes) -> bool:
    return head[:4] == QCOW2_MAGIC


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map `size` bytes: each L2 table maps cluster_size / 8 clusters."""
    l2_span = 1 << (2 * cluster_bits - 3)
    return -(-size // l2_span)


def parse_header(first_cluster: bytes, name: str = "image") -> Qcow2Header:
    """The header of a qcow2 image from (at least) its first cluster; ImageError if unusable.

    Pass as many bytes as there are when the file is shorter than a cluster.
    """
    if len(first_cluster) < HEADER_V2.size or not is_qcow2(first_cluster):
        raise ImageError(f"{name} is not a qcow2 image (no qcow2 header)")
    (_, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size, l1_offset,
     refcount_offset, refcount_clusters, nb_snapshots, _) = HEADER_V2.unpack_from(first_cluster)
    if version not in (2, 3):
        raise ImageError(f"{name}: qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"{name}: cluster_bits {cluster_bits} is out of range (9 to 21: 512 B to 2 MiB)")
    header = Qcow2Header(version, cluster_bits, size, l1_size, l1_offset, refcount_offset, refcount_clusters,
                         nb_snapshots)
    cluster_size = header.cluster_size
    first_cluster = first_cluster[:cluster_size]
    if version == 3:
        if len(first_cluster) < V3_HEADER_LENGTH:
            raise ImageError(f"{name}: the qcow2 v3 header is truncated")
        (header.incompatible, header.compatible, header.autoclear, header.refcount_order,
         header.header_length) = HEADER_V3.unpack_from(first_cluster, HEADER_V2.size)
        if (header.header_length < V3_HEADER_LENGTH or header.header_length % 8
                or header.header_length > min(cluster_size, len(first_cluster))):
            raise ImageError(f"{name}: bad qcow2 header_length {header.header_length}")
        if header.header_length > V3_HEADER_LENGTH and first_cluster[V3_HEADER_LENGTH] != 0 \
                and not header.incompatible & (1 << 3):
            raise ImageError(f"{name}: a compression type is set without its incompatible feature bit")
    extensions_end = min(backing_offset, len(first_cluster)) if backing_offset else len(first_cluster)
    _parse_extensions(header, first_cluster, extensions_end, name)
    _check_features(header, name)
    if crypt_method:
        raise ImageError(f"{name}: encrypted qcow2 images are not supported (crypt_method {crypt_method})")
    if header.refcount_order > 6:
        raise ImageError(f"{name}: refcount_order {header.refcount_order} is out of range (at most 6: 64-bit)")
    if size >= 1 << 63:
        raise ImageError(f"{name}: virtual size {size} is out of range")
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{name}: L1 table of {l1_size} entries is too large (at most {MAX_L1_BYTES >> 3})")
    if l1_size < l1_entries_for(size, cluster_bits):
        raise ImageError(f"{name}: L1 table of {l1_size} entries cannot map the virtual size {size}")
    if l1_offset % cluster_size or (l1_size and not l1_offset) or l1_offset > OFFSET_MASK:
        raise ImageError(f"{name}: L1 table offset {l1_offset:#x} is not a non-zero multiple of the cluster size")
    if refcount_offset % cluster_size or not refcount_offset or refcount_offset > OFFSET_MASK:
        raise ImageError(f"{name}: refcount table offset {refcount_offset:#x} is not a non-zero multiple of the"
                         " cluster size")
    if not refcount_clusters or refcount_clusters * cluster_size > MAX_REFCOUNT_TABLE_BYTES:
        raise ImageError(f"{name}: a refcount table of {refcount_clusters} clusters is out of range")
    if backing_offset:
        if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > len(first_cluster):
            raise ImageError(f"{name}: the backing file name lies outside the header cluster or is too long")
        header.backing_file = os.fsdecode(bytes(first_cluster[backing_offset:backing_offset + backing_size]))
        if not header.backing_file:
            raise ImageError(f"{name}: empty backing file name")
    return header


def _parse_extensions(header: Qcow2Header, data: bytes, end: int, name: str) -> None:
    position = header.header_length
    seen = set()
    while position + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(data, position)
        if kind == EXTENSION_END:
            return
        body_start = position + EXTENSION.size
        if body_start + length > end:
            raise ImageError(f"{name}: header extension {kind:#x} runs past the header area")
        if kind in seen and kind != 0:
            raise ImageError(f"{name}: header extension {kind:#x} appears twice")
        seen.add(kind)
        body = bytes(data[body_start:body_start + length])
        if kind == EXTENSION_BACKING_FORMAT:
            header.backing_format = body.decode("ascii", "replace")
        elif kind == EXTENSION_FEATURE_NAMES:
            for offset in range(0, length - FEATURE_NAME.size + 1, FEATURE_NAME.size):
                kind_of_feature, bit, raw = FEATURE_NAME.unpack_from(body, offset)
                header.feature_names[(kind_of_feature, bit)] = raw.rstrip(b"\0").decode("ascii", "replace")
        position = body_start + (length + 7) // 8 * 8


def _check_features(header: Qcow2Header, name: str) -> None:
    for bit in range(64):
        if not header.incompatible >> bit & 1 or bit in (0, 1):
            continue
        label = INCOMPATIBLE_NAMES.get(bit) or header.feature_names.get((0, bit)) or "unknown"
        raise ImageError(f"{name}: unsupported qcow2 incompatible feature bit {bit} ({label})")


def create_qcow2(path, size: int, backing_file: str | None = None, backing_format: str | None = None,
                 cluster_size: int = 65536) -> None:
    """Create a new, empty qcow2 v3 image at `path` (which must not exist).

    backing_file is stored exactly as given; a relative name is relative to the image's
    directory when the image is opened (as QEMU does). Without backing_format, the backing
    file's format is probed now and recorded, so that opening never has to guess.
    """
    path = Path(path)
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"{path}: cluster size {cluster_size} is not a power of two from 512 B to 2 MiB")
    if size < 0 or size >= 1 << 63:
        raise ImageError(f"{path}: size {size} is out of range")
    l1_size = l1_entries_for(size, cluster_bits)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{path}: {size} bytes is too large for {cluster_size}-byte clusters (use larger ones)")
    header_cluster = _header_cluster(path, size, backing_file, backing_format, cluster_bits, l1_size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, header_cluster.pop("metadata"), 0)
        os.ftruncate(fd, header_cluster["file_size"])  # the L1 table is all zeros: leave it sparse
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink()
        raise
    os.close(fd)


def _header_cluster(path: Path, size: int, backing_file: str | None, backing_format: str | None,
                    cluster_bits: int, l1_size: int) -> dict:
    """The bytes of a new image's metadata (header, refcount table and blocks) and its file size.

    Layout: header cluster, refcount table, refcount blocks, L1 table. The number of
    refcount blocks depends on how many clusters all of that takes, hence the loop.
    """
    cluster_size = 1 << cluster_bits
    entries_per_block = cluster_size * 8 // 16
    l1_clusters = -(-l1_size * 8 // cluster_size)
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        needed_blocks = -(-total // entries_per_block)
        needed_table = -(-needed_blocks * 8 // cluster_size)
        if (needed_blocks, needed_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, needed_blocks), max(table_clusters, needed_table)
    if table_clusters * cluster_size > MAX_REFCOUNT_TABLE_BYTES:
        raise ImageError(f"{path}: image too large for {cluster_size}-byte clusters")
    table_offset = cluster_size
    blocks_offset = table_offset + table_clusters * cluster_size
    l1_offset = blocks_offset + blocks * cluster_size

    extensions = b""
    name = b""
    if backing_file is not None:
        name = os.fsencode(backing_file)
        if not name or len(name) > MAX_BACKING_NAME:
            raise ImageError(f"{path}: the backing file name must be 1 to {MAX_BACKING_NAME} bytes")
        backing_format = backing_format or _probe_backing_format(path, backing_file)
        if backing_format not in ("raw", "qcow2"):
            raise ImageError(f"{path}: backing format {backing_format!r} is not supported (raw or qcow2)")
        extensions += _extension(EXTENSION_BACKING_FORMAT, backing_format.encode())
    extensions += EXTENSION.pack(EXTENSION_END, 0)
    backing_offset = V3_HEADER_LENGTH + len(extensions) if name else 0
    if backing_offset + len(name) > cluster_size:
        raise ImageError(f"{path}: the backing file name does not fit in a {cluster_size}-byte header cluster")
    header = HEADER_V2.pack(QCOW2_MAGIC, 3, backing_offset, len(name), cluster_bits, size, 0, l1_size, l1_offset,
                            table_offset, table_clusters, 0, 0)
    header += HEADER_V3.pack(0, 0, 0, 4, V3_HEADER_LENGTH)
    metadata = bytearray(l1_offset)
    metadata[:len(header) + len(extensions) + len(name)] = header + extensions + name
    for index in range(blocks):
        struct.pack_into(">Q", metadata, table_offset + 8 * index, blocks_offset + index * cluster_size)
    used = 1 + table_clusters + blocks + l1_clusters
    struct.pack_into(f">{used}H", metadata, blocks_offset, *([1] * used))
    return {"metadata": bytes(metadata), "file_size": l1_offset + l1_clusters * cluster_size}


def _extension(kind: int, body: bytes) -> bytes:
    return EXTENSION.pack(kind, len(body)) + body + bytes(-len(body) % 8)


def _probe_backing_format(path: Path, backing_file: str) -> str:
    backing = Path(backing_file)
    if not backing.is_absolute():
        backing = path.parent / backing
    try:
        with open(backing, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise ImageError(f"{path}: cannot probe the backing file {backing} ({os.strerror(error.errno)});"
                         " name its format") from None
    return "qcow2" if is_qcow2(head) else "raw"
