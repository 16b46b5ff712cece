"""Bad input to the command line gives one line and a non-zero status, never a traceback."""

import sys

from tests.helpers import one_line_error, sandvmm


def test_unknown_subcommand_is_a_usage_error():
    result = sandvmm("frobnicate")
    assert result.returncode == 2
    one_line_error(result)


def test_lab_with_too_little_memory():
    result = sandvmm("lab", "--mem", "100", "--", "true")
    assert result.returncode == 2
    assert "too little memory" in one_line_error(result)


def test_lab_with_more_memory_than_the_host_has():
    result = sandvmm("lab", "--mem", str(64 * 1024 * 1024), "--", "true")
    assert result.returncode == 2
    assert "more memory than this host has" in one_line_error(result)


def test_lab_without_a_command():
    result = sandvmm("lab")
    assert result.returncode == 2
    assert "no command" in one_line_error(result)


def test_lab_without_qemu_installed(tmp_path):
    # A PATH holding only python: qemu-system-x86_64 cannot be found.
    (tmp_path / "python").symlink_to(sys.executable)
    result = sandvmm("lab", "--", "true", env={"PATH": str(tmp_path)})
    assert "qemu-system-x86_64 is not installed" in one_line_error(result)


def test_lab_rw_must_be_a_directory(tmp_path):
    result = sandvmm("lab", "--rw", str(tmp_path / "missing"), "--", "true")
    assert result.returncode == 2
    assert "not a directory" in one_line_error(result)


def test_a_non_numeric_option_value():
    result = sandvmm("lab", "--mem", "lots", "--", "true")
    assert result.returncode == 2
    one_line_error(result)
