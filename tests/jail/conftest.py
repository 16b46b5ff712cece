"""Fixtures for jail's tests: jailed children that never outlive their test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jail import JailConfig, JailedProcess, spawn

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies" / "x86_64"
MINIMAL_POLICY = POLICIES / "test_minimal.policy"


@pytest.fixture
def jails():
    """start(config, target) -> JailedProcess; every child is killed and reaped at the end."""
    started: list[JailedProcess] = []

    def start(config: JailConfig, target) -> JailedProcess:
        process = spawn(config, target)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=10)
        process.close()


@pytest.fixture
def pipe():
    """(read end, write end); both closed at the end of the test."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def namespace_ids(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}")
            for ns in ("pid", "mnt", "net", "ipc", "uts", "user")}
