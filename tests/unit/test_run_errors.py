"""`sandvmm run` refuses bad input with one line (exit 2 for usage) before touching KVM."""

import pytest

from sandvmm.doctor import kvm_status
from tests.helpers import one_line_error, sandvmm


def test_missing_kernel(tmp_path):
    result = sandvmm("run", "--kernel", str(tmp_path / "vmlinuz"), "--", "true")
    assert result.returncode == 2
    assert "no such file" in one_line_error(result)


@pytest.mark.parametrize("start, message", [(b"MZ", "not a bootable x86-64 bzImage"),
                                            (b"\x7fELF\x01", "not a bootable x86-64 vmlinux")])
def test_a_file_that_is_not_a_kernel(tmp_path, start, message):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(start + b"\0" * 8192)
    result = sandvmm("run", "--kernel", str(kernel), "--", "true")
    assert result.returncode == 2
    assert message in one_line_error(result)


@pytest.mark.parametrize("mem, message", [("16", "too small"), (str(1 << 30), "more than this host")])
def test_mem_out_of_range(mem, message):
    result = sandvmm("run", "--mem", mem, "--", "true")
    assert result.returncode == 2
    assert message in one_line_error(result)


def test_zero_cpus():
    result = sandvmm("run", "--cpus", "0", "--", "true")
    assert result.returncode == 2
    assert "--cpus 0" in one_line_error(result)


def test_kvm_device_not_accessible(tmp_path):
    error = one_line_error(sandvmm("run", "--kvm-device", str(tmp_path / "kvm"), "--", "true"))
    assert "cannot open" in error and "kvm group" in error


@pytest.mark.parametrize("options, says", [
    (["--serial", "type=telnet"], "type=telnet"),
    (["--serial", "hardware=virtio-gpu"], "hardware"),
    (["--serial", "type=file"], "path="),
    (["--serial", "stdin=maybe,hardware=virtio-console"], "stdin"),
    (["--serial", "stdin=true"], "virtio-console"),
    (["--serial", "hardware=virtio-console", "--serial", "hardware=virtio-console,type=sink"], "twice"),
    (["--seccomp-policy-dir", "/nonexistent", "--no-rng", "--serial", "hardware=virtio-console"], "no seccomp policy"),
])
def test_bad_serial_and_sandbox_options(options, says):
    result = sandvmm("run", *options, "--", "true")
    error = one_line_error(result)
    assert says in error
    assert result.returncode == 2


def test_a_host_with_emulated_kvm_is_pointed_to_the_lab():
    result = sandvmm("run", "--", "true")
    if kvm_status().hardware:
        assert result.returncode == 0, result  # nothing to refuse: the guest boots
    else:
        assert "sandvmm lab" in one_line_error(result)
