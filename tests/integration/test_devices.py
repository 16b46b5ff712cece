"""Virtio devices in jailed children, seen from the guest and from the host."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandvmm.image.build import find_image
from tests.helpers import describe, sandvmm

pytestmark = pytest.mark.kvm

POLICIES = Path(__file__).resolve().parents[2] / "policies" / "x86_64"
CONSOLE_SINK = "type=sink,hardware=virtio-console"


def image_args(extra: list[str]) -> list[str]:
    image = find_image(extra)
    assert image is not None, f"tests/images.py builds the --with {extra} image first"
    return ["--kernel", str(image.kernel), "--initrd", str(image.initrd)]


def test_lspci_lists_the_rng_and_the_console():
    result = sandvmm("run", *image_args(["pciutils"]), "--serial", CONSOLE_SINK, "--", "lspci", "-nn")
    assert result.returncode == 0, describe(result)
    # pci.ids names them "Virtio 1.0 RNG" and "Virtio 1.0 console".
    assert "RNG [1af4:1044]" in result.stdout and "console [1af4:1043]" in result.stdout, describe(result)
    assert "Host bridge [1b36:0008]" in result.stdout, describe(result)


def test_no_rng_removes_the_device():
    result = sandvmm("run", "--no-rng", "--", "sh", "-c", "cat /sys/bus/pci/devices/*/device")
    assert result.returncode == 0, describe(result)
    assert "0x1044" not in result.stdout and "0x0008" in result.stdout, describe(result)


def test_the_guest_reads_a_mebibyte_of_entropy():
    script = ("cat /sys/class/misc/hw_random/rng_current; dd if=/dev/hwrng of=/tmp/r bs=4096 count=256 2>/dev/null;"
              " wc -c < /tmp/r; gzip -c /tmp/r | wc -c")
    result = sandvmm("run", "--", "sh", "-c", script)
    assert result.returncode == 0, describe(result)
    current, size, compressed = result.stdout.split()[-3:]
    assert current.startswith("virtio_rng"), describe(result)
    assert int(size) == 1 << 20
    assert int(compressed) > 1 << 20, "1 MiB from /dev/hwrng compressed: it is not random"


def test_hvc0_writes_reach_the_host_sink(tmp_path):
    sink = tmp_path / "hvc0.txt"
    result = sandvmm("run", "--serial", f"type=file,path={sink},hardware=virtio-console", "--",
                     "sh", "-c", "echo hello-from-hvc0 > /dev/hvc0; echo second line > /dev/hvc0")
    assert result.returncode == 0, describe(result)
    assert sink.read_text().splitlines() == ["hello-from-hvc0", "second line"]


def test_stdin_true_feeds_hvc0(tmp_path):
    sink = tmp_path / "hvc0.txt"
    result = sandvmm("run", "--serial", f"type=file,path={sink},hardware=virtio-console,stdin=true", "--",
                     "sh", "-c", "head -n 1 /dev/hvc0 | tr a-z A-Z > /dev/hvc0", input="hello from the host\n")
    assert result.returncode == 0, describe(result)
    assert "HELLO FROM THE HOST" in sink.read_text()  # (the tty also echoes the input itself)


def test_msi_x_off_falls_back_to_intx():
    result = sandvmm("run", "--params", "pci=nomsi", "--", "sh", "-c",
                     "dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c; grep -c virtio /proc/interrupts")
    assert result.returncode == 0, describe(result)
    size, interrupt_lines = result.stdout.split()[-2:]
    assert int(size) == 16 * 4096
    assert int(interrupt_lines) >= 1, describe(result)


# --- the jail, seen from the host -------------------------------------------------------------

def children_of(pid: int) -> dict[int, str]:
    """pid -> comm of every process whose parent is pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if int(fields["PPid"]) == pid:
                found[int(entry)] = fields["Name"].strip()
    return found


class RunningVm:
    """`sandvmm run ... -- sleep 600` in the background, with its device children."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "sandvmm", "run", "-v", *args, "--", "sleep", "600"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        assert "booting" in line, line + self.process.stderr.read()
        self.children = children_of(self.process.pid)

    def device(self, name: str) -> int:
        return next(pid for pid, comm in self.children.items() if name in comm)

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=30)
        return status, self.process.stderr.read()


def status_fields(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines())}


def test_every_device_child_is_jailed():
    vm = RunningVm("--serial", CONSOLE_SINK)
    try:
        assert len(vm.children) == 2, vm.children
        main_pid = vm.process.pid
        for pid in vm.children:
            fields = status_fields(pid)
            assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1", fields
            assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, fields
            for namespace in ("pid", "mnt", "net", "ipc"):
                assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/{main_pid}/ns/{namespace}")
            assert os.listdir(f"/proc/{pid}/root") == [], f"host files visible to device {vm.children[pid]}"
    finally:
        status, stderr = vm.stop()
    assert status == 128 + signal.SIGTERM, stderr
    assert not children_of(main_pid)


def test_killing_a_device_child_stops_the_vm_and_leaves_no_orphans():
    vm = RunningVm("--serial", CONSOLE_SINK)
    rng = vm.device("rng")
    os.kill(rng, signal.SIGKILL)
    status, stderr = vm.process.wait(timeout=10), vm.process.stderr.read()
    assert status != 0
    assert "device rng" in stderr and "SIGKILL" in stderr, stderr
    for pid in vm.children:
        assert not Path(f"/proc/{pid}").exists(), f"device child {vm.children[pid]} outlived the VM"


def policies_without(tmp_path: Path, device: str, syscall: str) -> Path:
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICIES, policy_dir)
    path = policy_dir / f"{device}.policy"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not line.startswith(f"{syscall}:")]
    assert len(kept) == len(lines) - 1, f"{path.name} has no {syscall} rule to remove"
    path.write_text("\n".join(kept) + "\n")
    return policy_dir


def test_a_forbidden_syscall_stops_the_vm_naming_device_and_syscall(tmp_path):
    policy_dir = policies_without(tmp_path, "rng", "getrandom")
    process = subprocess.Popen([sys.executable, "-m", "sandvmm", "run", "--seccomp-policy-dir", str(policy_dir),
                                "--", "sh", "-c", "dd if=/dev/hwrng bs=64 count=1 | wc -c; sleep 600"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "forbidden system call" in line:
                reported = time.monotonic()
                break
        else:
            pytest.fail(f"no violation reported: {''.join(lines)}")
        status = process.wait(timeout=10)
        assert time.monotonic() - reported < 2
    finally:
        if process.poll() is None:
            process.kill()
    assert status != 0
    assert "device rng" in lines[-1] and "getrandom" in lines[-1], lines


def test_seccomp_log_failures_logs_the_violation_and_keeps_the_vm_running(tmp_path):
    policy_dir = policies_without(tmp_path, "rng", "getrandom")
    result = sandvmm("run", "--seccomp-policy-dir", str(policy_dir), "--seccomp-log-failures", "--",
                     "sh", "-c", "dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | wc -c")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split()[-1] == str(4 * 4096)
    assert "device rng" in result.stderr and "getrandom" in result.stderr, describe(result)


def test_disable_sandbox_runs_devices_unjailed():
    vm = RunningVm("--disable-sandbox")
    try:
        (pid,) = vm.children
        fields = status_fields(pid)
        assert fields["Seccomp"] == "0"
        assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{vm.process.pid}/ns/pid")
    finally:
        status, stderr = vm.stop()
    assert status == 128 + signal.SIGTERM, stderr


# --- guest RAM, seen from the host --------------------------------------------------------------

def test_guest_ram_is_one_shared_memfd_asking_for_huge_pages():
    """Main asks for huge pages on every host (VmFlags hg); where the host's policy grants
    them (the lab sets advise) the kernel and initrd main wrote sit in 2 MiB pages."""
    from sandvmm.doctor import shmem_huge_pages

    vm = RunningVm()
    try:
        smaps = Path(f"/proc/{vm.process.pid}/smaps").read_text()
        rng = Path(f"/proc/{vm.device('rng')}/maps").read_text()
    finally:
        vm.stop()
    mappings = smaps.split("\n")
    at = next(i for i, line in enumerate(mappings) if "memfd:sandvmm-guest-ram" in line)
    fields = dict(line.split(":", 1) for line in mappings[at + 1:at + 30] if ":" in line)
    assert "hg" in fields["VmFlags"].split(), fields["VmFlags"]
    if shmem_huge_pages() in ("advise", "always", "within_size", "force"):
        assert int(fields["ShmemPmdMapped"].split()[0]) > 0, "the kernel and initrd main wrote sit in 4 KiB pages"
    assert "memfd:sandvmm-guest-ram" in rng  # the device child maps the very same RAM
