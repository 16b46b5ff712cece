"""RawDisk, FileIO, and opening image chains in main (images.py): formats, backing files,
loops, missing files, O_DIRECT, and locks that keep out other sandvmm processes and QEMU."""

import fcntl
import mmap
import os
import random
import shutil
import signal
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from sandvmm.devices.block.disk import SPLIT_BYTES, DiskError, ImageError, RawDisk, TransferHelpers, address_of
from sandvmm.devices.block.images import (
    MAX_CHAIN_DEPTH,
    PERM_WRITE,
    USE_BASE,
    flock_byte,
    image_fds,
    open_chain,
    open_image,
)
from sandvmm.devices.block.qcow2 import Qcow2Disk, create_qcow2

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="needs qemu-img and qemu-io (qemu-utils)")


def raw_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --- RawDisk --------------------------------------------------------------------------------

def test_scatter_reads_and_gather_writes_go_straight_to_the_views(tmp_path):
    content = bytearray(raw_file(tmp_path / "a.raw", MiB))
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        assert disk.size == MiB
        views = [memoryview(bytearray(n)) for n in (1, 4095, 0, 70_000)]
        disk.read_into(12345, views)
        assert b"".join(views) == content[12345:12345 + 74_096]
        pieces = [b"a" * 3, b"", b"b" * 5000, b"c" * 1]
        disk.write_from(MiB - 5004, [memoryview(piece) for piece in pieces])
        disk.flush()
    content[MiB - 5004:] = b"".join(pieces)
    assert (tmp_path / "a.raw").read_bytes() == content


def test_more_views_than_iov_max(tmp_path):
    raw_file(tmp_path / "a.raw", 8192)
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        disk.write_from(0, [memoryview(bytes([index % 256])) for index in range(3000)])
        views = [memoryview(bytearray(1)) for _ in range(3000)]
        disk.read_into(0, views)
    assert [view[0] for view in views] == [index % 256 for index in range(3000)]


@pytest.mark.parametrize("start", [0, 8192 - 3000], ids=["whole", "past-the-end"])
def test_views_of_any_format_move_their_bytes(tmp_path, start):
    # One call moves them as they are; a short read goes on from byte views of them.
    content = raw_file(tmp_path / "a.raw", 8192)
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        views = [memoryview(bytearray(2000)).cast("I"), memoryview(bytearray(4000)).cast("Q")]
        disk.read_into(start, views)
        expected = content[start:start + 6000].ljust(6000, b"\0")
        assert b"".join(view.tobytes() for view in views) == expected
        disk.write_from(1, [memoryview(b"\x05" * 8).cast("Q"), memoryview(b"\x06" * 4).cast("I")])
        assert bytes(disk.io.read(0, 14)) == content[:1] + b"\x05" * 8 + b"\x06" * 4 + content[13:14]


def test_zero_length_views_beyond_iov_max_before_the_data(tmp_path):
    content = raw_file(tmp_path / "a.raw", 8192)
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        out = bytearray(100)
        disk.read_into(50, [memoryview(b"")] * 1500 + [memoryview(out)])
    assert out == content[50:150]


def test_reading_past_the_end_of_the_file_gives_zeros(tmp_path):
    raw_file(tmp_path / "a.raw", 1000)
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDONLY), True)) as disk:
        out = bytearray(b"\xff" * 100)
        disk.read_into(950, [memoryview(out)])
    assert out[50:] == bytes(50) and out[:50] != bytes(50)


# --- large transfers split between threads -----------------------------------------------------

def with_helpers(disk, threads=2):
    disk.io.helpers = TransferHelpers(threads)
    return disk


def recorded_calls(monkeypatch):
    """(thread name, offset, length) of every preadv/pwritev, in the order they were made."""
    import threading
    calls = []
    for name in ("preadv", "pwritev"):
        real = getattr(os, name)

        def record(fd, views, offset, real=real):
            done = real(fd, views, offset)
            calls.append((threading.current_thread().name, offset, done))
            return done
        monkeypatch.setattr(os, name, record)
    return calls


@pytest.mark.parametrize("layout", [[3 * SPLIT_BYTES], [1, 4095] + [4096] * 300 + [SPLIT_BYTES - 3]],
                         ids=["one view", "odd views"])
def test_large_writes_are_split_between_the_caller_and_helpers(tmp_path, monkeypatch, layout):
    content = bytearray(raw_file(tmp_path / "a.raw", 4 * SPLIT_BYTES))
    total = sum(layout)
    data = random.Random(1).randbytes(total)
    with closing(with_helpers(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False))) as disk:
        calls = recorded_calls(monkeypatch)
        views, rest = [], memoryview(data)
        for size in layout:
            views.append(rest[:size])
            rest = rest[size:]
        disk.write_from(5000, views)
    # Three parts, each but the last of the same whole pages, covering the range once.
    part = -(-total // 3 // 4096) * 4096
    assert sorted((offset, length) for _, offset, length in calls) == [
        (5000, part), (5000 + part, part), (5000 + 2 * part, total - 2 * part)]
    assert "MainThread" in {thread for thread, *_ in calls}  # the helpers take what they find
    content[5000:5000 + total] = data
    assert (tmp_path / "a.raw").read_bytes() == content


def test_reads_and_small_writes_stay_in_the_calling_thread(tmp_path, monkeypatch):
    content = raw_file(tmp_path / "a.raw", 4 * SPLIT_BYTES)
    with closing(with_helpers(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False))) as disk:
        calls = recorded_calls(monkeypatch)
        out = bytearray(3 * SPLIT_BYTES)
        disk.read_into(1, [memoryview(out)])
        disk.write_from(0, [memoryview(bytes(SPLIT_BYTES - 1))])
    assert out == content[1:1 + 3 * SPLIT_BYTES]
    assert [(thread, length) for thread, _, length in calls] == [("MainThread", 3 * SPLIT_BYTES),
                                                                ("MainThread", SPLIT_BYTES - 1)]


def test_an_error_in_any_part_fails_the_transfer_after_every_part_ended(tmp_path, monkeypatch):
    import threading
    raw_file(tmp_path / "a.raw", 4 * SPLIT_BYTES)
    real = os.pwritev
    helper_writing = threading.Event()
    finished, failed = [], []

    def fail_in_the_caller(fd, views, offset):
        if threading.current_thread().name == "MainThread":
            helper_writing.wait(5)
            failed.append(sum(view.nbytes for view in views))
            raise OSError(5, "Input/output error")
        helper_writing.set()
        time.sleep(0.05)  # the caller fails meanwhile: it must still wait for this part
        finished.append(real(fd, views, offset))
        return finished[-1]
    with closing(with_helpers(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False), threads=1)) as disk:
        monkeypatch.setattr(os, "pwritev", fail_in_the_caller)
        with pytest.raises(DiskError) as error:
            disk.write_from(0, [memoryview(bytes(2 * SPLIT_BYTES))])
        assert "Input/output error" in str(error.value)
        assert helper_writing.is_set() and sum(finished) + sum(failed) == 2 * SPLIT_BYTES  # all ended


@pytest.mark.parametrize("operation", ["discard", "zero_unmap"])
def test_discard_and_unmapping_zeroes_punch_holes(tmp_path, operation):
    raw_file(tmp_path / "a.raw", 4 * MiB)
    before = allocated(tmp_path / "a.raw")
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        if operation == "discard":
            disk.discard(MiB, 2 * MiB)
        else:
            disk.write_zeroes(MiB, 2 * MiB, unmap=True)
        disk.flush()
        out = bytearray(2 * MiB)
        disk.read_into(MiB, [memoryview(out)])
    assert allocated(tmp_path / "a.raw") <= before - 2 * MiB
    assert os.path.getsize(tmp_path / "a.raw") == 4 * MiB
    if operation == "zero_unmap":
        assert out == bytes(2 * MiB)


def test_write_zeroes_without_unmap_keeps_the_space(tmp_path):
    content = bytearray(raw_file(tmp_path / "a.raw", MiB))
    before = allocated(tmp_path / "a.raw")
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDWR), False)) as disk:
        disk.write_zeroes(1000, 300_000, unmap=False)
    content[1000:301_000] = bytes(300_000)
    assert (tmp_path / "a.raw").read_bytes() == content
    assert allocated(tmp_path / "a.raw") >= before


def test_a_read_only_raw_disk_refuses_every_change(tmp_path):
    raw_file(tmp_path / "a.raw", 4096)
    with closing(RawDisk(os.open(tmp_path / "a.raw", os.O_RDONLY), True)) as disk:
        for call in (lambda: disk.write_from(0, [memoryview(b"x")]), lambda: disk.discard(0, 512),
                     lambda: disk.write_zeroes(0, 512, False)):
            with pytest.raises(DiskError, match="read-only"):
                call()


def test_host_errors_become_one_line_disk_errors(tmp_path):
    raw_file(tmp_path / "a.raw", 4096)
    fd = os.open(tmp_path / "a.raw", os.O_RDONLY)
    disk = RawDisk(fd, False)  # claims writable over a read-only fd: the write fails in the kernel
    with pytest.raises(DiskError) as error:
        disk.write_from(0, [memoryview(b"x")])
    assert "\n" not in str(error.value) and "Bad file descriptor" in str(error.value)
    disk.close()


def test_a_probed_raw_image_refuses_a_qcow2_header_from_the_guest(tmp_path):
    raw_file(tmp_path / "a.raw", 65536)
    with closing(open_image(tmp_path / "a.raw", read_only=False)) as disk:
        assert isinstance(disk, RawDisk)
        with pytest.raises(DiskError, match="qcow2 header"):
            disk.write_from(0, [memoryview(b"QF"), memoryview(b"I\xfb" + bytes(100))])
        disk.write_from(2, [memoryview(b"I\xfb")])  # alone, these bytes are not a header
        disk.write_from(0, [memoryview(b"ext4")])
    assert (tmp_path / "a.raw").read_bytes()[:4] == b"ext4"


def test_block_device_size_comes_from_seeking(tmp_path):
    loop = shutil.which("losetup")
    if os.geteuid() != 0 or not loop or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    raw_file(tmp_path / "a.raw", 3 * MiB)
    result = subprocess.run([loop, "--find", "--show", str(tmp_path / "a.raw")], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"losetup: {result.stderr.strip()}")
    device = result.stdout.strip()
    try:
        with closing(open_image(Path(device), read_only=False)) as disk:
            assert disk.size == 3 * MiB and disk.block_device
            disk.write_zeroes(0, MiB, unmap=False)
            disk.discard(MiB, MiB)
            out = bytearray(MiB)
            disk.read_into(0, [memoryview(out)])
        assert out == bytes(MiB)
    finally:
        subprocess.run([loop, "--detach", device], check=False)


def test_direct_io_with_aligned_and_unaligned_requests(tmp_path, monkeypatch):
    content = bytearray(raw_file(tmp_path / "a.raw", MiB))
    used = []  # the fd each write went through
    real_pwritev = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, views, offset: used.append(fd) or real_pwritev(fd, views, offset))
    disk, fds = open_chain(tmp_path / "a.raw", read_only=False, direct=True)
    with closing(disk):
        assert len(fds) == 2 and fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_DIRECT
        assert not fcntl.fcntl(fds[1], fcntl.F_GETFL) & os.O_DIRECT  # the twin for unaligned transfers
        aligned = mmap.mmap(-1, 8192)  # page aligned: the O_DIRECT path proper
        disk.read_into(4096, [memoryview(aligned)])
        assert aligned[:] == content[4096:12288]
        aligned[:] = b"\x5a" * 8192
        disk.write_from(8192, [memoryview(aligned).toreadonly()])  # as a guest's write request comes
        disk.write_from(3, [memoryview(b"odd")])  # unaligned: through the page cache for this call
        assert used == [fds[0], fds[1]]
        odd = bytearray(10)
        disk.read_into(1, [memoryview(odd)])
        disk.flush()
    content[8192:16384] = b"\x5a" * 8192
    content[3:6] = b"odd"
    assert odd == content[1:11]
    assert (tmp_path / "a.raw").read_bytes() == content


def test_alignment_is_seen_through_read_only_views():
    """A guest's write request arrives as read-only views of guest RAM: they still go direct."""
    ram = mmap.mmap(-1, 3 * 4096)
    view = memoryview(ram).toreadonly()
    assert address_of(view[4096:8192]) == address_of(memoryview(ram)[4096:])
    assert address_of(view[4096:8192]) % 4096 == 0 and address_of(view[100:]) % 4096 == 100


def test_direct_io_under_qcow2(tmp_path):
    create_qcow2(tmp_path / "a.qcow2", 4 * MiB)
    expected = bytearray(4 * MiB)
    buffer = mmap.mmap(-1, 65536)
    with closing(open_image(tmp_path / "a.qcow2", read_only=False, direct=True)) as disk:
        for index, offset in enumerate((0, 65536 * 5, 12288, 3 * MiB + 4096)):
            buffer[:] = bytes([index + 1]) * 65536
            disk.write_from(offset, [memoryview(buffer)[:32768]])  # allocating, and into allocated clusters
            expected[offset:offset + 32768] = buffer[:32768]
        disk.write_from(777, [memoryview(b"unaligned")])
        expected[777:786] = b"unaligned"
        disk.write_zeroes(65536 * 5, 65536, unmap=True)
        expected[65536 * 5:65536 * 6] = bytes(65536)
        disk.read_into(0, [memoryview(buffer)])
        assert buffer[:] == expected[:65536]
    with closing(open_image(tmp_path / "a.qcow2", read_only=True)) as disk:
        seen = bytearray(4 * MiB)
        disk.read_into(0, [memoryview(seen)])
    assert seen == expected


# --- opening chains -------------------------------------------------------------------------

def test_formats_are_told_apart_by_their_magic(tmp_path):
    raw_file(tmp_path / "a.raw", 8192)
    create_qcow2(tmp_path / "a.qcow2", MiB)
    with closing(open_image(tmp_path / "a.raw", read_only=True)) as raw, \
            closing(open_image(tmp_path / "a.qcow2", read_only=True)) as qcow2:
        assert isinstance(raw, RawDisk) and isinstance(qcow2, Qcow2Disk)


def test_the_chain_hands_over_every_fd_it_uses(tmp_path):
    raw_file(tmp_path / "base.raw", MiB)
    create_qcow2(tmp_path / "mid.qcow2", MiB, backing_file="base.raw")
    create_qcow2(tmp_path / "top.qcow2", MiB, backing_file=str(tmp_path / "mid.qcow2"))
    disk, fds = open_chain(tmp_path / "top.qcow2", read_only=False)
    with closing(disk):
        assert len(fds) == 3 and image_fds(disk) == fds
        assert not disk.read_only and disk.backing.read_only and disk.backing.backing.read_only
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds] == \
            [str(tmp_path / name) for name in ("top.qcow2", "mid.qcow2", "base.raw")]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_backing_loops_are_refused(tmp_path):
    create_qcow2(tmp_path / "b.qcow2", MiB, backing_file="a.qcow2", backing_format="qcow2")
    create_qcow2(tmp_path / "a.qcow2", MiB, backing_file="b.qcow2")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageError) as error:
        open_image(tmp_path / "a.qcow2", read_only=True)
    message = str(error.value)
    assert "backing file loop" in message and message.count("a.qcow2") == 2 and "\n" not in message
    assert set(os.listdir("/proc/self/fd")) <= before  # every fd it opened is closed again


def test_overly_deep_chains_are_refused(tmp_path):
    raw_file(tmp_path / "0.raw", 4096)
    names = ["0.raw"]
    for level in range(1, MAX_CHAIN_DEPTH + 1):
        create_qcow2(tmp_path / f"{level}.qcow2", 4096, backing_file=names[-1], cluster_size=512)
        names.append(f"{level}.qcow2")
    with closing(open_image(tmp_path / names[-2], read_only=True)):  # exactly the limit: fine
        pass
    with pytest.raises(ImageError, match="deeper than 64"):
        open_image(tmp_path / names[-1], read_only=True)


def test_missing_files_name_who_is_missing(tmp_path):
    with pytest.raises(ImageError) as error:
        open_image(tmp_path / "nothing.qcow2", read_only=True)
    assert str(error.value) == f"image {tmp_path / 'nothing.qcow2'}: not found"
    create_qcow2(tmp_path / "top.qcow2", MiB, backing_file="gone.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError) as error:
        open_image(tmp_path / "top.qcow2", read_only=False)
    assert str(error.value) == f"backing file {tmp_path / 'gone.qcow2'} of {tmp_path / 'top.qcow2'}: not found"


def test_the_recorded_backing_format_is_obeyed(tmp_path):
    create_qcow2(tmp_path / "inner.qcow2", MiB)
    create_qcow2(tmp_path / "as-raw.qcow2", MiB, backing_file="inner.qcow2", backing_format="raw")
    with closing(open_image(tmp_path / "as-raw.qcow2", read_only=True)) as disk:
        assert isinstance(disk.backing, RawDisk)  # told raw: no probing, even though it looks like qcow2
    raw_file(tmp_path / "plain.raw", 4096)
    create_qcow2(tmp_path / "liar.qcow2", MiB, backing_file="plain.raw", backing_format="qcow2")
    with pytest.raises(ImageError, match="not qcow2"):
        open_image(tmp_path / "liar.qcow2", read_only=True)
    with pytest.raises(ImageError, match="'vmdk' is not supported"):
        create_qcow2(tmp_path / "vmdk.qcow2", MiB, backing_file="x.vmdk", backing_format="vmdk")


def test_a_disk_keeps_working_in_a_forked_child(tmp_path):
    create_qcow2(tmp_path / "a.qcow2", MiB)
    disk = open_image(tmp_path / "a.qcow2", read_only=False)
    pid = os.fork()
    if pid == 0:
        try:
            disk.write_from(4096, [memoryview(b"from the child")])
            disk.close()
            os._exit(0)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    disk.close()
    with closing(open_image(tmp_path / "a.qcow2", read_only=True)) as again:
        out = bytearray(14)
        again.read_into(4096, [memoryview(out)])
    assert out == b"from the child"


# --- locks ----------------------------------------------------------------------------------

def test_two_writers_exclude_each_other_until_close(tmp_path):
    create_qcow2(tmp_path / "a.qcow2", MiB)
    first = open_image(tmp_path / "a.qcow2", read_only=False)
    with pytest.raises(ImageError) as error:
        open_image(tmp_path / "a.qcow2", read_only=False)
    assert str(error.value).startswith(f"image {tmp_path / 'a.qcow2'} is in use by another process (locked)")
    with pytest.raises(ImageError, match="locked"):
        open_image(tmp_path / "a.qcow2", read_only=True)  # nor may anyone read it while it changes
    first.close()
    open_image(tmp_path / "a.qcow2", read_only=False).close()


def test_readers_share_but_nobody_writes_a_base_in_use(tmp_path):
    raw_file(tmp_path / "base.raw", MiB)
    create_qcow2(tmp_path / "one.qcow2", MiB, backing_file="base.raw")
    create_qcow2(tmp_path / "two.qcow2", MiB, backing_file="base.raw")
    with closing(open_image(tmp_path / "one.qcow2", read_only=False)), \
            closing(open_image(tmp_path / "two.qcow2", read_only=False)), \
            closing(open_image(tmp_path / "base.raw", read_only=True)):
        with pytest.raises(ImageError, match="in use"):
            open_image(tmp_path / "base.raw", read_only=False)
    open_image(tmp_path / "base.raw", read_only=False).close()


def test_the_lock_lives_as_long_as_the_child_holds_the_fd(tmp_path):
    create_qcow2(tmp_path / "a.qcow2", MiB)
    disk = open_image(tmp_path / "a.qcow2", read_only=False)
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    disk.close()  # main closes its copy after handing the fds to the child
    try:
        with pytest.raises(ImageError, match="in use"):
            open_image(tmp_path / "a.qcow2", read_only=False)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    open_image(tmp_path / "a.qcow2", read_only=False).close()


def test_locking_can_be_skipped(tmp_path):
    create_qcow2(tmp_path / "a.qcow2", MiB)
    with closing(open_image(tmp_path / "a.qcow2", read_only=False)):
        open_image(tmp_path / "a.qcow2", read_only=True, lock=False).close()


@needs_qemu
def test_locks_keep_qemu_out_and_qemu_keeps_us_out(tmp_path):
    image = tmp_path / "a.qcow2"
    create_qcow2(image, MiB)
    with closing(open_image(image, read_only=False)):
        result = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert result.returncode != 0 and "lock" in result.stderr
    with closing(open_image(image, read_only=True)):  # a reader leaves QEMU's readers alone...
        subprocess.run(["qemu-img", "info", str(image)], capture_output=True, check=True)
        result = subprocess.run(["qemu-io", "-c", "write 0 512", str(image)], capture_output=True, text=True)
        assert result.returncode != 0 and "lock" in result.stderr  # ...but not its writers
    qemu = subprocess.Popen(["qemu-io", "-c", "sleep 20000", str(image)])
    try:
        # Wait until QEMU holds its write lock. The probe only asks (F_OFD_GETLK): taking a
        # reader's locks here could make QEMU's own open fail instead.
        with open(image, "rb") as probe:
            for _ in range(200):
                if flock_byte(probe.fileno(), fcntl.F_OFD_GETLK, fcntl.F_WRLCK, USE_BASE + PERM_WRITE)[0] != fcntl.F_UNLCK:
                    break
                assert qemu.poll() is None, "qemu-io exited before locking the image"
                time.sleep(0.05)
        with pytest.raises(ImageError, match="in use by another process"):
            open_image(image, read_only=False)
    finally:
        qemu.kill()
        qemu.wait()
