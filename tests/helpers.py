"""Small helpers shared by the tests: running the sandvmm command line as a user would."""

import os
import subprocess
import sys


def sandvmm(*args, env=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m sandvmm ARGS` and capture its output as text."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "sandvmm", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kwargs)


def describe(result: subprocess.CompletedProcess) -> str:
    """The end of a command's output, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a failed command, checked to be a single `sandvmm...:` line with no traceback.

    Progress lines (`sandvmm image: ...`) may come before it.
    """
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("sandvmm image: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sandvmm"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
