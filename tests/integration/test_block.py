"""virtio-blk in a jailed child: raw and qcow2 images, seen from the guest and from qemu-img."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandvmm.image.build import find_image
from tests.helpers import describe, one_line_error, sandvmm

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PATTERN_OFFSET = 3 * MiB + 512  # not cluster-aligned, to cross qcow2 cluster boundaries


def boot(*args, script: str, timeout: int = 600):
    image = find_image(["e2fsprogs"])
    assert image is not None, "tests/images.py builds the --with e2fsprogs image first"
    return sandvmm("run", "--kernel", str(image.kernel), "--initrd", str(image.initrd), *args,
                   "--", "sh", "-c", script, timeout=timeout)


def md5sums(result: subprocess.CompletedProcess) -> list[str]:
    """The digests `md5sum < FILE` printed, in order (a kernel line may follow them on the console)."""
    return re.findall(r"\b([0-9a-f]{32})  -", result.stdout)


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_disk(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def qcow2_disk(path: Path, size: str = "64M", backing: Path | None = None) -> Path:
    args = ["create-qcow2", *(["--backing-file", str(backing)] if backing else []), str(path)]
    result = sandvmm(*args, *([size] if size else []))
    assert result.returncode == 0, describe(result)
    return path


def qemu_img(*args) -> str:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_raw(image: Path, offset: int, length: int, tmp_path: Path) -> bytes:
    """The guest-visible bytes of any image, as qemu-img converts it."""
    raw = tmp_path / f"{image.name}.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    with open(raw, "rb") as file:
        file.seek(offset)
        return file.read(length)


WRITE_FILES = ("mkfs.ext4 -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
               "seq 1 20000 > /mnt/numbers && echo kept > /mnt/note && sync && umount /mnt && poweroff -f")
READ_FILES = "mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/note && md5sum < /mnt/numbers"


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_a_filesystem_persists_across_boots(tmp_path, kind):
    disk = raw_disk(tmp_path / "disk.img") if kind == "raw" else qcow2_disk(tmp_path / "disk.qcow2")
    first = boot("--block", str(disk), script=WRITE_FILES)
    assert first.returncode == 0, describe(first)
    second = boot("--block", str(disk), script=READ_FILES)
    assert second.returncode == 0, describe(second)
    expected = hashlib.md5("".join(f"{n}\n" for n in range(1, 20001)).encode()).hexdigest()
    assert "kept" in second.stdout.split() and md5sums(second) == [expected], describe(second)
    if kind == "qcow2":
        qemu_img("check", str(disk))


def test_guest_writes_are_what_qemu_img_sees(tmp_path):
    disk = qcow2_disk(tmp_path / "disk.qcow2")
    script = (f"head -c 70000 /dev/hwrng > /tmp/data && dd if=/tmp/data of=/dev/vda bs=1 seek={PATTERN_OFFSET} "
              "conv=fsync 2>/dev/null && md5sum < /tmp/data")
    result = boot("--block", str(disk), script=script)
    assert result.returncode == 0, describe(result)
    qemu_img("check", str(disk))
    written = read_raw(disk, PATTERN_OFFSET, 70000, tmp_path)
    assert md5sums(result) == [hashlib.md5(written).hexdigest()], describe(result)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_an_image_qemu_wrote_is_read_correctly(tmp_path, compat):
    disk = tmp_path / "qemu.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4096", str(disk), "64M")
    start = PATTERN_OFFSET - 512  # sector-aligned, so dd can read from it
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a {start} 65536", str(disk)],
                   check=True, capture_output=True, timeout=60)
    result = boot("--block", f"{disk},ro", script=f"dd if=/dev/vda bs=512 skip={start // 512} "
                                                    "count=130 2>/dev/null | md5sum")
    assert result.returncode == 0, describe(result)
    expected = hashlib.md5(b"\x5a" * 65536 + bytes(2 * 512)).hexdigest()  # 128 sectors written, 2 not
    assert md5sums(result) == [expected], describe(result)


def test_a_backing_chain_reads_the_base_and_writes_only_the_overlay(tmp_path):
    base = raw_disk(tmp_path / "base.img")
    with open(base, "r+b") as file:
        file.seek(PATTERN_OFFSET)
        file.write(b"from the base image\n")
    before = checksum(base)
    overlay = qcow2_disk(tmp_path / "overlay.qcow2", size="", backing=base)
    script = (f"dd if=/dev/vda bs=1 skip={PATTERN_OFFSET} count=20 2>/dev/null; "
              f"echo 'from the overlay!!!' | dd of=/dev/vda bs=1 seek={PATTERN_OFFSET} conv=fsync 2>/dev/null")
    result = boot("--block", str(overlay), script=script)
    assert result.returncode == 0, describe(result)
    assert "from the base image" in result.stdout, describe(result)
    assert checksum(base) == before
    assert read_raw(overlay, PATTERN_OFFSET, 20, tmp_path) == b"from the overlay!!!\n"
    qemu_img("check", str(overlay))


def test_a_read_only_disk_refuses_writes_and_stays_untouched(tmp_path):
    disk = raw_disk(tmp_path / "disk.img")
    before = checksum(disk)
    result = boot("--block", f"{disk},ro", script="cat /sys/block/vda/ro; dd if=/dev/zero of=/dev/vda bs=4096 "
                                                  "count=1 conv=fsync 2>/dev/null && echo wrote || echo refused")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split()[-2:] == ["1", "refused"], describe(result)
    assert checksum(disk) == before


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_fsynced_data_survives_sigkill_of_sandvmm(tmp_path, kind):
    disk = raw_disk(tmp_path / "disk.img") if kind == "raw" else qcow2_disk(tmp_path / "disk.qcow2")
    image = find_image(["e2fsprogs"])
    script = (f"echo 'durable bytes' | dd of=/dev/vda bs=1 seek={PATTERN_OFFSET} conv=fsync 2>/dev/null; "
              "echo synced; sleep 600")
    process = subprocess.Popen([sys.executable, "-m", "sandvmm", "run", "--kernel", str(image.kernel),
                                "--initrd", str(image.initrd), "--block", str(disk), "--", "sh", "-c", script],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.strip() == "synced":
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    if kind == "qcow2":
        qemu_img("check", str(disk))  # leaked clusters would be reported but pass; corruption fails
    assert read_raw(disk, PATTERN_OFFSET, 14, tmp_path) == b"durable bytes\n"


def test_a_second_vm_cannot_write_an_image_in_use(tmp_path):
    disk = qcow2_disk(tmp_path / "disk.qcow2")
    image = find_image(["e2fsprogs"])
    first = subprocess.Popen([sys.executable, "-m", "sandvmm", "run", "-v", "--kernel", str(image.kernel),
                              "--initrd", str(image.initrd), "--block", str(disk), "--", "sleep", "600"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "booting" in first.stderr.readline()
        second = boot("--block", str(disk), script="true")
        assert second.returncode == 2
        assert "in use" in one_line_error(second) or "locked" in one_line_error(second)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def test_the_block_child_sees_no_files_and_its_policy_has_no_open(tmp_path):
    import jail

    policy = jail.load_policy(Path(__file__).resolve().parents[2] / "policies" / "x86_64" / "block.policy")
    assert not {"open", "openat", "openat2", "creat", "open_by_handle_at"} & set(policy.rules)
    disk = raw_disk(tmp_path / "disk.img")
    image = find_image(["e2fsprogs"])
    process = subprocess.Popen([sys.executable, "-m", "sandvmm", "run", "-v", "--no-rng", "--kernel",
                                str(image.kernel), "--initrd", str(image.initrd), "--block", str(disk),
                                "--", "sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "booting" in process.stderr.readline()
        children = [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                    and Path(f"/proc/{pid}/stat").exists()
                    and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(process.pid)]
        assert len(children) == 1
        (child,) = children
        # The child jails itself while the guest boots (it runs no device code before): wait for it.
        deadline = time.monotonic() + 60
        while "Seccomp:\t2" not in (status := Path(f"/proc/{child}/status").read_text()):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert os.listdir(f"/proc/{child}/root") == []
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
