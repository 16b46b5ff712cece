"""Qcow2Disk and create_qcow2 against QEMU's own tools (qemu-img, qemu-io) and a bytearray model.

Interoperability both ways, backing chains, random operation sequences, crashes (a
simulated power cut at any write, and SIGKILL of a forked writer), and every refusal.
"""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandvmm.devices.block.disk import DiskError, FileIO, ImageError
from sandvmm.devices.block.images import open_image
from sandvmm.devices.block.qcow2 import Qcow2Disk, create_qcow2

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="needs qemu-img and qemu-io (qemu-utils)")
MiB = 1 << 20


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=True)


def qemu_io(path, *commands, image_format="qcow2") -> None:
    arguments = [item for command in commands for item in ("-c", command)]
    subprocess.run(["qemu-io", "-f", image_format, *arguments, str(path)], capture_output=True, check=True)


def qemu_check(path, leaks_allowed=False) -> dict:
    """qemu-img check's findings; fails on any corruption (and on leaks unless allowed)."""
    result = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True)
    assert result.returncode in ((0, 3) if leaks_allowed else (0,)), result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    assert leaks_allowed or report.get("leaks", 0) == 0, report
    return report


def qemu_raw(path, tmp_path) -> bytes:
    """The guest-visible bytes of an image, as QEMU reads them."""
    out = tmp_path / f"{Path(path).name}.raw"
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


def read_all(disk) -> bytes:
    data = bytearray(disk.size)
    disk.read_into(0, [memoryview(data)])
    return bytes(data)


def new_image(path, size, *options, backing=None):
    args = ["create", "-q", "-f", "qcow2", *options]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    qemu_img(*args, path, size)
    return path


def open_qcow2(path, read_only=False, **kwargs) -> Qcow2Disk:
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    return Qcow2Disk(fd, None, read_only, name=str(path), **kwargs)


def split_views(data: bytes, pieces: int) -> list[memoryview]:
    """data as a gather list of `pieces` views (uneven, some maybe empty)."""
    cuts = sorted(random.Random(len(data) * 31 + pieces).randrange(len(data) + 1) for _ in range(pieces - 1))
    edges = [0, *cuts, len(data)]
    return [memoryview(data)[a:b] for a, b in zip(edges, edges[1:])]


# --- reading what QEMU wrote --------------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_reads_what_qemu_wrote(tmp_path, compat, cluster_size):
    image = new_image(tmp_path / "a.qcow2", 8 * MiB, "-o", f"compat={compat},cluster_size={cluster_size}")
    qemu_io(image, "write -P 0xab 0 64k", "write -P 0x5c 1000 3000", "write -P 0x11 4095k 2k",
            "write -P 0x77 8388000 608")
    if compat == "1.1":
        qemu_io(image, "write -z 2k 4k")  # a zero cluster or zeroed bytes
    with closing(open_image(image, read_only=True)) as disk:
        assert read_all(disk) == qemu_raw(image, tmp_path)
        assert disk.read_only


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width_reads_and_writes(tmp_path, refcount_bits):
    image = new_image(tmp_path / "a.qcow2", 2 * MiB, "-o", f"refcount_bits={refcount_bits},cluster_size=512")
    qemu_io(image, "write -P 0x42 0 8k")
    with closing(open_image(image, read_only=False)) as disk:
        disk.write_from(5000, [memoryview(b"\x99" * 300_000)])
        disk.discard(0, 4096)
    expected = bytearray(b"\x42" * 8192 + bytes(2 * MiB - 8192))
    expected[5000:305_000] = b"\x99" * 300_000
    expected[:4096] = bytes(4096)
    assert qemu_raw(image, tmp_path) == expected
    qemu_check(image)


def test_compressed_clusters_read_and_rewrite(tmp_path):
    plain = tmp_path / "plain.raw"
    content = bytearray(random.Random(1).choices(b"qcow", k=MiB))  # compresses about 4:1
    content[200_000:400_000] = bytes(200_000)
    content[600_000:700_000] = random.Random(2).randbytes(100_000)  # does not: stored plain
    plain.write_bytes(content)
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", plain, image)
    assert qemu_check(image)["compressed-clusters"] > 100
    with closing(open_image(image, read_only=False)) as disk:
        assert read_all(disk) == content
        disk.write_from(8190, [memoryview(b"new")])  # into two compressed clusters: copy on write
        disk.write_zeroes(16384, 8192, unmap=True)  # two whole compressed clusters freed
        content[8190:8193] = b"new"
        content[16384:24576] = bytes(8192)
        assert read_all(disk) == content
    assert qemu_raw(image, tmp_path) == content
    qemu_check(image)


# --- QEMU reading what we wrote -------------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_qemu_reads_what_we_wrote(tmp_path, compat, cluster_size):
    size = 3 * cluster_size + 4 * MiB + 1536  # qemu-img rounds sizes to 512 bytes
    image = new_image(tmp_path / "a.qcow2", size, "-o", f"compat={compat},cluster_size={cluster_size}")
    data = random.Random(2).randbytes(3 * cluster_size)
    payload = random.Random(3).randbytes(300_000)
    expected = bytearray(size)
    with closing(open_image(image, read_only=False)) as disk:
        disk.write_from(0, split_views(data, 4))
        disk.write_zeroes(cluster_size, cluster_size, unmap=False)  # v3: stays allocated, flagged zero
        disk.write_from(cluster_size + 10, [memoryview(b"\x77" * 100)])  # into that cluster
        disk.write_from(12345 + 3 * cluster_size, split_views(payload, 3))
        disk.write_from(size - 700, [memoryview(payload[:700])])  # the partial last cluster
        disk.write_zeroes(100_000, 70_000, unmap=False)
        disk.discard(max(0, 2 * cluster_size - 5000), 5000 + min(5000, 2 * cluster_size))
        ours = read_all(disk)
    expected[:len(data)] = data
    expected[cluster_size:2 * cluster_size] = bytes(cluster_size)
    expected[cluster_size + 10:cluster_size + 110] = b"\x77" * 100
    expected[12345 + 3 * cluster_size:12345 + 3 * cluster_size + 300_000] = payload
    expected[-700:] = payload[:700]
    expected[100_000:170_000] = bytes(70_000)
    discarded = slice(max(0, 2 * cluster_size - 5000), 2 * cluster_size + 5000)
    ours_kept, expected[discarded] = bytearray(ours), ours[discarded]  # a discard leaves its range undefined...
    assert ours_kept == expected
    assert qemu_raw(image, tmp_path) == ours  # ...but QEMU sees what we see
    qemu_check(image)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_created_images_satisfy_qemu(tmp_path, cluster_size):
    image = tmp_path / "new.qcow2"
    create_qcow2(image, 3 * MiB + 512, cluster_size=cluster_size)
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 3 * MiB + 512, cluster_size)
    assert info["format-specific"]["data"]["compat"] == "1.1"
    qemu_check(image)
    with closing(open_image(image, read_only=False)) as disk:
        disk.write_from(MiB, [memoryview(b"\xee" * 5000)])
    assert qemu_raw(image, tmp_path)[MiB:MiB + 5001] == b"\xee" * 5000 + b"\0"
    qemu_check(image)


def test_a_large_image_needs_several_refcount_blocks_at_creation(tmp_path):
    image = tmp_path / "big.qcow2"
    create_qcow2(image, 16 << 30, cluster_size=512)  # a 256 KiB L1 table: 3 refcount blocks
    qemu_check(image)
    with closing(open_image(image, read_only=False)) as disk:
        disk.write_from((16 << 30) - 4096, [memoryview(b"\x01" * 4096)])
    qemu_check(image)


def test_refcount_table_grows(tmp_path):
    image = tmp_path / "grow.qcow2"
    create_qcow2(image, 64 * MiB, cluster_size=512)  # one refcount table cluster counts 8 MiB of file
    data = random.Random(3).randbytes(10 * MiB)
    with closing(open_image(image, read_only=False)) as disk:
        for offset in range(0, len(data), MiB):
            disk.write_from(offset * 5, [memoryview(data)[offset:offset + MiB]])
        table_clusters = disk.refcounts.table_clusters
    assert table_clusters > 1
    raw = qemu_raw(image, tmp_path)
    assert all(raw[offset * 5:offset * 5 + MiB] == data[offset:offset + MiB] for offset in range(0, len(data), MiB))
    qemu_check(image)


# --- backing chains -------------------------------------------------------------------------

@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_overlay_reads_base_and_writes_only_itself(tmp_path, base_format):
    content = random.Random(4).randbytes(2 * MiB)
    base = tmp_path / f"base.{base_format}"
    (tmp_path / "b.raw").write_bytes(content)
    qemu_img("convert", "-O", base_format, tmp_path / "b.raw", base)
    before = base.read_bytes()
    (tmp_path / "sub").mkdir()
    overlay = tmp_path / "sub" / "top.qcow2"
    create_qcow2(overlay, 3 * MiB, backing_file=f"../{base.name}")  # relative to the overlay's directory
    expected = bytearray(content + bytes(MiB))  # the base is shorter: zeros past its end
    with closing(open_image(overlay, read_only=False)) as disk:
        assert read_all(disk) == expected
        disk.write_from(70_000, [memoryview(b"\x01" * 100)])  # copy-on-write of one cluster
        disk.write_zeroes(MiB, 128 * 1024, unmap=True)  # zero clusters hide the base
        disk.write_from(2 * MiB + 10, [memoryview(b"\x02" * 10)])  # past the base's end
        expected[70_000:70_100] = b"\x01" * 100
        expected[MiB:MiB + 131072] = bytes(131072)
        expected[2 * MiB + 10:2 * MiB + 20] = b"\x02" * 10
        assert read_all(disk) == expected
    assert base.read_bytes() == before
    assert qemu_raw(overlay, tmp_path) == expected
    qemu_check(overlay)
    info = json.loads(qemu_img("info", "--output=json", overlay).stdout)
    assert info["backing-filename-format"] == base_format


def test_three_level_chain(tmp_path):
    base = new_image(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 1 0 1M")
    middle = new_image(tmp_path / "middle.qcow2", MiB, backing="base.qcow2")
    qemu_io(middle, "write -P 2 64k 64k")
    top = new_image(tmp_path / "top.qcow2", MiB, backing="middle.qcow2")
    qemu_io(top, "write -P 3 100k 4k")
    with closing(open_image(top, read_only=True)) as disk:
        assert read_all(disk) == qemu_raw(top, tmp_path)


# --- random sequences against a model -------------------------------------------------------

def apply(disk, model: bytearray, op) -> None:
    name, offset, length, seed = op
    if name == "write":
        data = random.Random(seed).randbytes(length)
        disk.write_from(offset, split_views(data, 1 + seed % 3))
        model[offset:offset + length] = data
    elif name in ("zero", "zero_unmap"):
        disk.write_zeroes(offset, length, unmap=name == "zero_unmap")
        model[offset:offset + length] = bytes(length)
    elif name == "read":
        out = bytearray(length)
        disk.read_into(offset, split_views(out, 1 + seed % 3))
        assert out == model[offset:offset + length], op
    elif name == "flush":
        disk.flush()


def operations(size: int, cluster_size: int):
    aligned = st.integers(0, size // cluster_size - 1).map(lambda cluster: cluster * cluster_size)
    offset = st.one_of(st.integers(0, size - 1), aligned)
    length = st.one_of(st.integers(1, 3 * cluster_size), st.sampled_from([cluster_size, 2 * cluster_size]))
    name = st.sampled_from(["write", "write", "write", "zero", "zero_unmap", "discard", "read", "flush", "reopen"])
    return st.tuples(name, offset, length, st.integers(0, 2**16)).map(
        lambda op: (op[0], op[1], min(op[2], size - op[1]), op[3]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), cluster_size=st.sampled_from([512, 4096, 65536]), compat=st.sampled_from(["0.10", "1.1"]),
       with_backing=st.booleans())
def test_random_operations_match_a_model(tmp_path_factory, data, cluster_size, compat, with_backing):
    tmp_path = tmp_path_factory.mktemp("model")
    size = 64 * cluster_size + 1536  # a partial last cluster; several L2 tables with small clusters
    model = bytearray(size)
    backing = None
    if with_backing:
        model[:] = random.Random(5).randbytes(size - 5000) + bytes(5000)  # shorter than the overlay
        (tmp_path / "base.raw").write_bytes(model[:-5000])
        backing = "base.raw"
    image = new_image(tmp_path / "top.qcow2", size, "-o", f"compat={compat},cluster_size={cluster_size}",
                      backing=backing)
    disk = open_image(image, read_only=False)
    try:
        for op in data.draw(st.lists(operations(size, cluster_size), max_size=25)):
            if op[0] == "reopen":
                disk.close()
                disk = open_image(image, read_only=False)
            elif op[0] == "discard":  # reads back undefined: take what the disk says into the model
                disk.discard(op[1], op[2])
                out = bytearray(op[2])
                disk.read_into(op[1], [memoryview(out)])
                model[op[1]:op[1] + op[2]] = out
            else:
                apply(disk, model, op)
        assert read_all(disk) == model
    finally:
        disk.close()
    assert qemu_raw(image, tmp_path) == model
    qemu_check(image)


# --- crashes --------------------------------------------------------------------------------

class PowerCutIO(FileIO):
    """FileIO that logs each write with the bytes it replaced, and each sync, so that a test
    can rebuild what the disk may hold after a power cut at any moment: every write up to
    the last sync before the cut, plus any subset of the writes after it."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.log: list[tuple] = []

    def write_from(self, offset, views) -> None:
        new = b"".join(bytes(view) for view in views)
        self.log.append(("write", offset, os.pread(self.fd, len(new), offset), new, os.fstat(self.fd).st_size))
        super().write_from(offset, views)

    def sync(self) -> None:
        super().sync()
        self.log.append(("sync",))

    def after_cut(self, current: bytes, cut: int, rng: random.Random) -> bytes:
        last_sync = max([index for index, event in enumerate(self.log[:cut]) if event[0] == "sync"], default=-1)
        image = bytearray(current)
        for _, offset, old, _, size in reversed([event for event in self.log[last_sync + 1:] if event[0] == "write"]):
            image[offset:offset + len(old)] = old
            del image[size:]
        for event in self.log[last_sync + 1:cut]:  # in flight at the cut: each reached the disk or not
            if rng.random() < 0.5:
                _, offset, _, new, _ = event
                image.extend(bytes(max(0, offset - len(image))))
                image[offset:offset + len(new)] = new
        return bytes(image)


def assert_flushed_bytes_kept(seen: bytes, durable: bytes, unflushed_ops) -> None:
    """Every byte no unflushed operation touched reads as it was at the last flush."""
    touched = sorted((offset, offset + length) for name, offset, length, _ in unflushed_ops if name != "flush")
    position = 0
    for start, end in touched + [(len(durable), len(durable))]:
        if start > position:
            assert seen[position:start] == durable[position:start], f"flushed bytes in {position}..{start} changed"
        position = max(position, end)


def random_ops(rng: random.Random, size: int, count: int, names=("write", "write", "zero", "zero_unmap", "flush")):
    ops = []
    for _ in range(count):
        offset = rng.randrange(size)
        ops.append((rng.choice(names), offset, min(size - offset, rng.randrange(1, 20_000)), rng.randrange(2**16)))
    return ops


@pytest.mark.parametrize("seed", range(16))
def test_power_cut_at_any_write_loses_only_unflushed_data(tmp_path, seed):
    rng = random.Random(seed)
    size = 2 * MiB
    image = tmp_path / "a.qcow2"
    model = bytearray(size)
    backing = None
    if seed % 2:  # copy-on-write from a (shorter) backing file
        model[:-4096] = rng.randbytes(size - 4096)
        (tmp_path / "base.raw").write_bytes(model[:-4096])
        backing = open_image(tmp_path / "base.raw", read_only=True)
    create_qcow2(image, size, cluster_size=512, backing_file="base.raw" if backing else None)
    io = PowerCutIO(os.open(image, os.O_RDWR))
    disk = Qcow2Disk(io.fd, backing, False, io=io, cache_bytes=4096)  # 8 L2 tables: evictions sync mid-run
    flushed = [(0, bytes(model), 0)]  # (log length when a flush returned, model then, ops done)
    ops = random_ops(rng, size, 60, names=("write", "write", "zero", "zero_unmap", "discard", "flush"))
    starts = []  # log length when each op started
    for done, op in enumerate(ops, 1):
        starts.append(len(io.log))
        if op[0] == "discard":  # leaves its range undefined: the model takes what reads back
            disk.discard(op[1], op[2])
            model[op[1]:op[1] + op[2]] = bytes(op[2])
            disk.read_into(op[1], [memoryview(model)[op[1]:op[1] + op[2]]])
        else:
            apply(disk, model, op)
        if op[0] == "flush":
            flushed.append((len(io.log), bytes(model), done))
    current = image.read_bytes()
    syncs = [index for index, event in enumerate(io.log) if event[0] == "sync"]
    # Cutting just before a sync leaves the most writes in flight; a few cuts anywhere else too.
    for cut in sorted(rng.sample(syncs, min(8, len(syncs))) + rng.sample(range(len(io.log) + 1), 2)):
        position, durable, done = max(entry for entry in flushed if entry[0] <= cut)
        crashed = tmp_path / f"cut{cut}.qcow2"
        crashed.write_bytes(io.after_cut(current, cut, rng))
        qemu_check(crashed, leaks_allowed=True)
        with closing(open_image(crashed, read_only=False, lock=False)) as after:
            assert_flushed_bytes_kept(read_all(after), durable, ops[done:])
            after.write_from(0, [memoryview(b"after the crash")])  # the leaked image is still usable
        qemu_check(crashed, leaks_allowed=True)
    disk.close()


def test_sigkill_of_a_forked_writer_loses_only_unflushed_data(tmp_path):
    size = 4 * MiB
    killed_midway = 0
    for trial in range(6):
        rng = random.Random(100 + trial)
        image = tmp_path / f"k{trial}.qcow2"
        create_qcow2(image, size, cluster_size=4096)
        ops = random_ops(rng, size, 300)
        disk = open_image(image, read_only=False)
        progress_read, progress_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the device child: the disk came across fork, as in sandvmm
            try:
                scratch = bytearray(size)
                for index, op in enumerate(ops):
                    apply(disk, scratch, op)
                    os.write(progress_write, struct.pack("<I", index))
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(progress_write)
        target = rng.randrange(len(ops))
        reports = b""
        while len(reports) < 4 or struct.unpack_from("<I", reports, len(reports) - 4)[0] < target:
            reports += os.read(progress_read, 4096)
        time.sleep(rng.random() * 0.002)  # land somewhere inside a later operation
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(progress_read, 4096):
            reports += chunk
        os.close(progress_read)
        finished = struct.unpack_from("<I", reports, len(reports) - 4)[0] + 1
        killed_midway += finished < len(ops)
        durable_ops = max([index + 1 for index in range(finished) if ops[index][0] == "flush"], default=0)
        model = bytearray(size)
        for op in ops[:durable_ops]:
            apply(_ModelOnly(), model, op)
        disk.close()  # main's copy: clean, so closing it writes nothing
        qemu_check(image, leaks_allowed=True)
        with closing(open_qcow2(image, read_only=True)) as after:
            assert_flushed_bytes_kept(read_all(after), model, ops[durable_ops:])
    assert killed_midway >= 4


class _ModelOnly:
    """A disk that does nothing: lets apply() update just the model."""

    def write_from(self, offset, views):
        pass

    def write_zeroes(self, offset, length, unmap):
        pass

    def flush(self):
        pass


# --- refusals -------------------------------------------------------------------------------

def patched(tmp_path, changes, name="bad.qcow2", **create) -> Path:
    """A fresh image with header bytes replaced: changes is [(offset, struct format, value)]."""
    image = tmp_path / name
    create_qcow2(image, MiB, cluster_size=create.get("cluster_size", 65536))
    with open(image, "r+b") as file:
        for offset, layout, value in changes:
            file.seek(offset)
            file.write(struct.pack(layout, value))
    return image


def one_line(error: Exception, *words: str) -> str:
    message = str(error)
    assert "\n" not in message and all(word in message for word in words), message
    return message


@pytest.mark.parametrize("changes, says", [
    ([(0, ">4s", b"QFI\xfa")], "not a qcow2 image"),
    ([(4, ">I", 1)], "version 1"),
    ([(4, ">I", 4)], "version 4"),
    ([(20, ">I", 8)], "cluster_bits 8"),
    ([(20, ">I", 22)], "cluster_bits 22"),
    ([(24, ">Q", 1 << 63)], "virtual size"),
    ([(32, ">I", 1)], "encrypted"),
    ([(32, ">I", 2)], "encrypted"),  # LUKS (qemu-img's own LUKS setup is flaky to time here)
    ([(36, ">I", 1 << 30)], "L1 table of"),
    ([(24, ">Q", 1 << 40)], "cannot map"),
    ([(40, ">Q", 12345)], "L1 table offset"),
    ([(48, ">Q", 0)], "refcount table offset"),
    ([(56, ">I", 0)], "refcount table of 0 clusters"),
    ([(72, ">Q", 1 << 2)], "bit 2 (external data file)"),
    ([(72, ">Q", 1 << 4)], "bit 4 (extended L2 entries)"),
    ([(72, ">Q", 1 << 40)], "bit 40 (unknown)"),
    ([(96, ">I", 7)], "refcount_order 7"),
    ([(100, ">I", 100)], "header_length"),
    ([(8, ">Q", 65500), (16, ">I", 100)], "backing file name"),
    ([(104, ">I", 0x12345678), (108, ">I", 0xFFFF)], "runs past"),
])
def test_bad_headers_are_one_line_image_errors(tmp_path, changes, says):
    image = patched(tmp_path, changes)
    with pytest.raises(ImageError) as error:
        open_qcow2(image, read_only=True)
    one_line(error.value, str(image), says)


def test_a_named_unknown_feature_is_reported_by_its_name(tmp_path):
    image = new_image(tmp_path / "a.qcow2", MiB)  # QEMU writes a feature name table
    data = bytearray(image.read_bytes())
    at = data.index(b"\x00\x04extended L2")
    data[at:at + 2] = b"\x00\x2a"  # rename it as bit 42, then set bit 42
    struct.pack_into(">Q", data, 72, 1 << 42)
    image.write_bytes(data)
    with pytest.raises(ImageError) as error:
        open_qcow2(image, read_only=True)
    one_line(error.value, "bit 42 (extended L2 entries)")


@pytest.mark.parametrize("options, says", [
    (["-o", "extended_l2=on"], "extended L2"),
    (["-o", "data_file=data.raw"], "external data file"),
    (["-o", "compression_type=zstd"], "compression type"),
])
def test_qemu_features_we_do_not_support_are_refused(tmp_path, options, says):
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(image), "1M"], check=True, cwd=tmp_path)
    with pytest.raises(ImageError) as error:
        open_image(image, read_only=True)
    one_line(error.value, str(image), says)


def test_dirty_corrupt_and_snapshotted_images_open_only_read_only(tmp_path):
    lazy = new_image(tmp_path / "lazy.qcow2", MiB, "-o", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 4k", "-c", "abort", str(lazy)], capture_output=True)
    corrupt = patched(tmp_path, [(72, ">Q", 2)], name="corrupt.qcow2")
    snapshotted = new_image(tmp_path / "snap.qcow2", MiB)
    qemu_img("snapshot", "-c", "first", snapshotted)
    for image, says in ((lazy, "qemu-img check -r all"), (corrupt, "marked corrupt"), (snapshotted, "snapshot")):
        with pytest.raises(ImageError) as error:
            open_image(image, read_only=False)
        one_line(error.value, str(image), says)
        with closing(open_image(image, read_only=True)) as disk:
            disk.read_into(0, [memoryview(bytearray(4096))])
    with closing(open_image(lazy, read_only=True)) as disk:
        assert read_all(disk)[:4096] == b"\x07" * 4096


def test_stale_bitmaps_are_given_up_when_writing(tmp_path):
    image = new_image(tmp_path / "a.qcow2", MiB)
    qemu_img("bitmap", "--add", image, "dirty")
    with closing(open_image(image, read_only=False)) as disk:
        disk.write_from(0, [memoryview(b"x" * 512)])
    assert struct.unpack_from(">Q", image.read_bytes(), 88)[0] == 0  # the autoclear bit went first
    qemu_check(image, leaks_allowed=True)  # the abandoned bitmap's clusters may now count as leaked


def test_read_only_and_out_of_range_requests_fail_as_disk_errors(tmp_path):
    image = tmp_path / "a.qcow2"
    create_qcow2(image, MiB)
    with closing(open_qcow2(image, read_only=True)) as disk:
        for call in (lambda: disk.write_from(0, [memoryview(b"x")]), lambda: disk.discard(0, 512),
                     lambda: disk.write_zeroes(0, 512, True)):
            with pytest.raises(DiskError) as error:
                call()
            one_line(error.value, "read-only")
        with pytest.raises(DiskError):
            disk.read_into(MiB - 1, [memoryview(bytearray(2))])


def l2_entry_offset(image: Path, guest_offset: int) -> int:
    """Where in the file the L2 entry of a guest offset is (the image must map it)."""
    data = image.read_bytes()
    cluster_bits, = struct.unpack_from(">I", data, 20)
    l1_offset, = struct.unpack_from(">Q", data, 40)
    cluster = guest_offset >> cluster_bits
    l2, = struct.unpack_from(">Q", data, l1_offset + 8 * (cluster >> (cluster_bits - 3)))
    return (l2 & 0x00FF_FFFF_FFFF_FE00) + 8 * (cluster & ((1 << (cluster_bits - 3)) - 1))


def test_corruption_found_at_run_time_is_a_disk_error(tmp_path):
    image = new_image(tmp_path / "a.qcow2", MiB)
    qemu_io(image, "write -P 1 0 128k")
    entry_at = l2_entry_offset(image, 0)
    with open(image, "r+b") as file:
        file.seek(entry_at)
        file.write(struct.pack(">Q", 3 * 65536 | 1 << 63))  # guest cluster 0 -> the L1 table's cluster
        file.seek(entry_at + 8)
        file.write(struct.pack(">Q", 0x1234_5678 | 1 << 63))  # guest cluster 1: a misaligned offset
    with closing(open_image(image, read_only=False)) as disk:
        with pytest.raises(DiskError) as error:
            disk.write_from(0, [memoryview(b"x")])
        one_line(error.value, "metadata")
        with pytest.raises(DiskError) as error:
            disk.read_into(65536, [memoryview(bytearray(1))])
        one_line(error.value, "corrupt L2 entry")


def refcount_entry_offset(data: bytes, host_offset: int) -> int:
    """Where the 16-bit refcount of a host cluster is (64 KiB clusters, first refcount block)."""
    refcount_block = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 48)[0])[0]
    return refcount_block + 2 * (host_offset >> 16)


def test_clusters_whose_refcount_is_wrong_are_not_touched(tmp_path):
    image = new_image(tmp_path / "a.qcow2", MiB)
    qemu_io(image, "write -P 1 0 64k")
    data = bytearray(image.read_bytes())
    host = struct.unpack_from(">Q", data, l2_entry_offset(image, 0))[0] & 0x00FF_FFFF_FFFF_FE00
    struct.pack_into(">H", data, refcount_entry_offset(data, host), 0)  # in use, but its refcount says free
    image.write_bytes(data)
    with closing(open_qcow2(image)) as disk:
        for call in (lambda: disk.write_from(0, [memoryview(b"x")]), lambda: disk.discard(0, 65536)):
            with pytest.raises(DiskError) as error:
                call()
            one_line(error.value, "refcount 0, not 1")


def test_a_refcount_that_would_go_below_zero_is_a_disk_error(tmp_path):
    (tmp_path / "plain.raw").write_bytes(b"compressible" * (MiB // 12))
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", tmp_path / "plain.raw", image)
    data = bytearray(image.read_bytes())
    compressed, = struct.unpack_from(">Q", data, l2_entry_offset(image, 0))
    assert compressed & 1 << 62
    host = compressed & ((1 << 54) - 1)  # 64 KiB clusters: the offset is bits 0-53
    struct.pack_into(">H", data, refcount_entry_offset(data, host), 0)
    image.write_bytes(data)
    with closing(open_qcow2(image)) as disk:
        disk.write_zeroes(0, 65536, unmap=True)  # releases the compressed cluster's host cluster...
        with pytest.raises(DiskError) as error:
            disk.flush()  # ...whose refcount is already 0
        one_line(error.value, "refcount", "qemu-img check -r all")
