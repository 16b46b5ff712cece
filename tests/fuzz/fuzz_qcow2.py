"""Fuzz the qcow2 layer (sandvmm/devices/block/qcow2*.py) with atheris.

    python3 tests/fuzz/fuzz_qcow2.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python3 tests/fuzz/fuzz_qcow2.py --make-corpus tests/fuzz/corpus/qcow2   # (re)write the seeds

Each input is an image file (held in a memfd, as the device child holds an fd) plus a few
guest requests. The harness opens it, as writable or read-only and with or without a
backing disk, then plays the requests. An ImageError (refused at open) or DiskError
(refused at run time) is fine; any other exception is a finding, and so is a successful
write or write-zeroes that does not read back.

Input layout (missing bytes read as zero):
  u8   options: bit 0 read-only, bit 1 a 64 KiB raw backing disk of 0x5a bytes
  4 x 8 bytes, one request each: u8 kind (mod 5: read, write, discard, write zeroes,
       flush), u8 unmap, u32 offset (mod the virtual size), u16 length (mod 16 KiB)
  the rest: the image file
"""

import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["sandvmm.devices.block"]):
    from sandvmm.devices.block.disk import DiskError, ImageError, RawDisk
    from sandvmm.devices.block.qcow2 import Qcow2Disk, create_qcow2

REQUEST = struct.Struct("<BBIH")
PREFIX = 1 + 4 * REQUEST.size
MAX_LENGTH = 16 << 10
# Tables this large are legal but only make a run slow (their contents come from the input anyway).
MAX_L1_ENTRIES, MAX_REFCOUNT_TABLE_BYTES = 1 << 16, 1 << 20

image_fd = os.memfd_create("fuzz-qcow2")  # reused: creating one per input is slow
backing_fd = os.memfd_create("fuzz-qcow2-backing")
os.write(backing_fd, b"\x5a" * 65536)


def too_slow(image: bytes) -> bool:
    if len(image) < 72:
        return False
    cluster_bits, = struct.unpack_from(">I", image, 20)
    l1_size, = struct.unpack_from(">I", image, 36)
    refcount_clusters, = struct.unpack_from(">I", image, 56)
    return l1_size > MAX_L1_ENTRIES or refcount_clusters << min(cluster_bits, 21) > MAX_REFCOUNT_TABLE_BYTES


def run(data: bytes) -> None:
    data = data.ljust(PREFIX, b"\0")
    options, image = data[0], data[PREFIX:]
    if too_slow(image):
        return
    os.ftruncate(image_fd, 0)
    os.pwrite(image_fd, image, 0)
    backing = RawDisk(os.dup(backing_fd), True) if options & 2 else None
    fd = os.dup(image_fd)
    try:
        disk = Qcow2Disk(fd, backing, bool(options & 1))
    except ImageError:  # the fds stay the caller's when opening fails
        os.close(fd)
        if backing is not None:
            backing.close()
        return
    try:
        for kind, unmap, offset, length in REQUEST.iter_unpack(data[1:PREFIX]):
            offset %= max(disk.size, 1)
            length = min(length % MAX_LENGTH, disk.size - offset)
            try:
                play(disk, kind % 5, offset, length, bool(unmap & 1))
            except DiskError:
                pass
    finally:
        try:
            disk.close()
        except DiskError:
            pass


def play(disk, kind: int, offset: int, length: int, unmap: bool) -> None:
    out = bytearray(length)
    if kind == 0:
        disk.read_into(offset, [memoryview(out)])
    elif kind == 1:
        data = bytes((offset + index) & 0xFF for index in range(length))
        disk.write_from(offset, [memoryview(data)[:length // 2], memoryview(data)[length // 2:]])
        disk.read_into(offset, [memoryview(out)])
        assert out == data, "a write did not read back"
    elif kind == 2:
        disk.discard(offset, length)
    elif kind == 3:
        disk.write_zeroes(offset, length, unmap)
        disk.read_into(offset, [memoryview(out)])
        assert out == bytes(length), "write zeroes did not read back as zeros"
    else:
        disk.flush()


def make_corpus(directory: str) -> None:
    """Small valid images (512-byte clusters) with requests that reach their data."""
    import subprocess
    import tempfile

    os.makedirs(directory, exist_ok=True)
    requests = b"".join(REQUEST.pack(kind, unmap, offset, length) for kind, unmap, offset, length in (
        (1, 0, 1000, 3000), (0, 0, 0, 8192), (3, 1, 4096, 1024), (2, 0, 512, 2048)))
    with tempfile.TemporaryDirectory() as scratch:
        def image(name: str, *, writes=(), qemu: list[str] | None = None, **create) -> None:
            path = os.path.join(scratch, name)
            if qemu:
                subprocess.run(qemu + [path], check=True, capture_output=True)
            else:
                create_qcow2(path, 64 << 10, cluster_size=512, **create)
            fd = os.open(path, os.O_RDWR)
            disk = Qcow2Disk(fd, None, False)
            for offset, data in writes:
                disk.write_from(offset, [memoryview(data)])
            disk.close()
            with open(path, "rb") as file:
                body = file.read()
            for options in (0, 2):
                with open(os.path.join(directory, f"{name}-{options}"), "wb") as seed:
                    seed.write(bytes([options]) + requests + body)

        image("empty")
        image("data", writes=[(0, b"\x11" * 3000), (40_000, b"\x22" * 5000)])
        image("backing-name", backing_file="base.raw", backing_format="raw", writes=[(700, b"\x33" * 900)])
        image("v2", qemu=["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512"]
              + ["-o", "size=64K"], writes=[(100, b"\x44" * 2000)])
        compressed = os.path.join(scratch, "plain.raw")
        with open(compressed, "wb") as file:
            file.write(bytes(range(256)) * 64)
        image("compressed", qemu=["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", compressed])


def TestOneInput(data: bytes) -> None:
    run(data)


def main() -> None:
    if sys.argv[1:2] == ["--make-corpus"]:
        return make_corpus(sys.argv[2])
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
