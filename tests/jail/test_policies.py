"""The policy files in policies/x86_64: they compile, they are sufficient for a real
trio device child, and they keep out what a device must never do."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket

import pytest

from jail import JailConfig, load_policy, seccomp
from tests.jail.conftest import POLICIES
from tests.jail.device_program import DeviceFds, device_main, drive_device

COMMON = POLICIES / "common_device.policy"
NEVER_IN_A_DEVICE = {
    "open", "openat", "openat2", "creat", "execve", "execveat", "fork", "vfork", "clone",
    "clone3", "ptrace", "mount", "umount2", "pivot_root", "unshare", "setns", "socket",
    "bpf", "process_vm_writev", "process_vm_readv", "init_module", "finit_module", "kexec_load",
    "mprotect", "pkey_mprotect", "seccomp", "prctl", "connect", "bind", "chroot",
}


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.policy")), ids=lambda p: p.name)
@pytest.mark.parametrize("action", sorted(seccomp.VIOLATION_ACTIONS))
def test_every_policy_file_compiles(path, action):
    program = seccomp.compile_program(load_policy(path), action)
    assert len(program) % 8 == 0 and len(program) > 8


def test_common_device_policy_keeps_out_what_a_device_must_never_do():
    rules = load_policy(COMMON).rules
    assert not NEVER_IN_A_DEVICE & set(rules)
    # Every way to map memory excludes PROT_EXEC, checked against the rule's own meaning.
    for prot in (mmap.PROT_EXEC, mmap.PROT_READ | mmap.PROT_EXEC):
        for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS):
            assert not rules["mmap"].allows([0, 4096, prot, flags, 0, 0])
    assert rules["mmap"].allows([0, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, 3, 0])
    assert str(rules["socketpair"]) == f"socketpair: arg0 == {socket.AF_UNIX:#x}"


def test_what_the_trace_tool_records_is_all_in_common_device():
    from tests.jail.trace_device_syscalls import trace
    seen = trace()
    assert {"epoll_wait", "recvmsg", "mmap", "write"} <= set(seen)
    assert set(seen) <= set(load_policy(COMMON).rules), set(seen) - set(load_policy(COMMON).rules)


def test_device_program_runs_under_common_device_with_kill(jails):
    """Any syscall missing from the policy would kill the child with SIGSYS."""
    fds = DeviceFds.create()
    try:
        child = jails(JailConfig("device", COMMON, "kill", keep_fds=(2, *fds.child_fds())),
                      lambda: device_main(fds))
        drive_device(fds)
        assert child.wait(timeout=10) == 0, child.describe_exit()
    finally:
        fds.close()


@pytest.mark.parametrize("forbidden", ["executable_memory", "inet_socket", "open_file"])
def test_common_device_kills_what_it_does_not_allow(jails, forbidden):
    def target() -> None:
        if forbidden == "executable_memory":
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
        elif forbidden == "inet_socket":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            os.open("/", os.O_RDONLY)

    child = jails(JailConfig("device", COMMON, "kill", keep_fds=()), target)
    assert child.wait(timeout=10) == -signal.SIGSYS


BLOCK = POLICIES / "block.policy"
THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes to clone


def test_block_policy_allows_threads_and_nothing_like_a_process():
    rules = load_policy(BLOCK).rules
    assert rules["clone"].allows([THREAD_FLAGS, 0, 0, 0, 0, 0])
    fork = signal.SIGCHLD
    new_namespace = THREAD_FLAGS | 0x10000000  # CLONE_NEWUSER
    for flags in (fork, fork | 0x100, new_namespace, THREAD_FLAGS & ~0x10000):  # a process sharing memory
        assert not rules["clone"].allows([flags, 0, 0, 0, 0, 0])
    assert rules["clone3"].errno == errno.ENOSYS  # its flags are out of seccomp's sight
    assert not rules["mprotect"].allows([0, 4096, mmap.PROT_READ | mmap.PROT_EXEC, 0, 0, 0])
    assert rules["mprotect"].allows([0, 4096, mmap.PROT_READ | mmap.PROT_WRITE, 0, 0, 0])


def test_transfer_helpers_copy_under_the_block_policy_with_kill(jails, tmp_path):
    """Helper threads start after the jail: their clone, stack and futexes must all be allowed."""
    from sandvmm.devices.block.disk import SPLIT_BYTES, FileIO, TransferHelpers

    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT)
    data = os.urandom(2 * SPLIT_BYTES)  # getrandom is not the block child's
    try:
        def target() -> None:
            io = FileIO(fd, name="image")
            io.helpers = TransferHelpers(2)
            io.write_from(4096, [memoryview(data)])
            back = bytearray(len(data))
            io.read_into(4096, [memoryview(back)[:100], memoryview(back)[100:]])
            os._exit(0 if back == data else 3)

        child = jails(JailConfig("block", BLOCK, "kill", keep_fds=(2, fd)), target)
        assert child.wait(timeout=20) == 0, child.describe_exit()
    finally:
        os.close(fd)
