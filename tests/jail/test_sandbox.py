"""Real jailed children on this host: what they can see, hold, and call.

Each child blocks in os.read() on a pipe the test holds, so the test can look at it
from outside (/proc/PID/...) while it is fully jailed, then releases it.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest
import trio

from jail import JailConfig, JailError, Policy, load_policy, parse_policy, spawn, start
from tests.jail.conftest import (
    MINIMAL_POLICY,
    POLICIES,
    REPO,
    namespace_ids,
    proc_status,
)

WITH_OPENAT = parse_policy("@include test_minimal.policy\nopenat: 1\n", "with_openat.policy",
                           include_dir=POLICIES)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def blocking_target(read_end: int):
    """Wait for one byte from the test, and exit with its value."""
    return lambda: os.read(read_end, 1)[0]


def test_child_is_confined_in_every_respect(jails, pipe):
    read_end, write_end = pipe
    child = jails(JailConfig("confined", MINIMAL_POLICY, "kill", keep_fds=(read_end,)),
                  blocking_target(read_end))
    status = proc_status(child.pid)
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capability_set], 16) == 0, capability_set
    host_uid = "65534" if os.geteuid() == 0 else str(os.geteuid())
    assert status["Uid"].split() == [host_uid] * 4
    if os.geteuid() == 0:
        assert status["Gid"].split() == ["65534"] * 4 and status["Groups"].strip() == ""
    assert status["NSpid"].split() == [str(child.pid), "1"]  # pid 1 of its own namespace
    assert os.getppid() != child.pid and os.waitid(os.P_PID, child.pid, os.WEXITED |
                                                   os.WNOHANG | os.WNOWAIT) is None
    ours, its = namespace_ids("self"), namespace_ids(child.pid)
    assert all(ours[ns] != its[ns] for ns in ours), (ours, its)
    assert read(f"/proc/{child.pid}/uid_map").split() == ["0", host_uid, "1"]
    # Nothing of the host: an empty, read-only root and only the fd we kept.
    assert os.listdir(f"/proc/{child.pid}/root") == []
    with pytest.raises(OSError) as caught:
        os.open(f"/proc/{child.pid}/root/planted", os.O_CREAT | os.O_WRONLY)
    assert caught.value.errno == errno.EROFS
    (root_mount,) = read(f"/proc/{child.pid}/mountinfo").splitlines()
    assert root_mount.split()[4] == "/" and root_mount.split()[5].startswith("ro,")
    assert os.listdir(f"/proc/{child.pid}/fd") == [str(read_end)]
    assert read(f"/proc/{child.pid}/limits").split("Max open files")[1].split()[:2] == \
        ["256", "256"]
    os.write(write_end, bytes([42]))
    assert child.wait(timeout=10) == 42


def test_bind_mounts_are_the_only_files_and_honour_read_only(jails, pipe, tmp_path):
    read_end, report = pipe  # the child reports what happened on the pipe's write end
    shared = tmp_path / "shared"
    shared.mkdir()
    config_file = tmp_path / "config.txt"
    config_file.write_text("host data")
    # World-writable, so that only the read-only mounts can refuse the child (uid 65534).
    # tmp_path itself stays 0700: the caller opens bind sources with its own rights.
    os.chmod(shared, 0o777)
    os.chmod(config_file, 0o666)

    def target() -> None:
        fd = os.open("/data/from-child", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"written in the jail")
        os.close(fd)
        fd = os.open("/etc/config.txt", os.O_RDONLY)
        os.write(report, os.read(fd, 100) + b"\n")
        os.close(fd)
        for path, flags in (("/etc/config.txt", os.O_WRONLY),
                            ("/new-file", os.O_CREAT | os.O_WRONLY)):
            try:
                os.close(os.open(path, flags, 0o644))
                os.write(report, b"opened\n")
            except OSError as e:
                os.write(report, f"{errno.errorcode[e.errno]}\n".encode())

    child = jails(JailConfig("binds", WITH_OPENAT, "kill", keep_fds=(report,),
                             bind_mounts=[(str(shared), "/data", True),
                                          (str(config_file), "/etc/config.txt", False)]),
                  target)
    assert child.wait(timeout=10) == 0
    assert os.read(read_end, 1000).split() == [b"host", b"data", b"EROFS", b"EROFS"]
    assert (shared / "from-child").read_text() == "written in the jail"


def test_only_bind_mounts_are_visible_with_their_flags(jails, pipe, tmp_path):
    read_end, write_end = pipe
    config_file = tmp_path / "config.txt"
    config_file.write_text("host data")
    child = jails(JailConfig("mounts", MINIMAL_POLICY, "kill", keep_fds=(read_end,),
                             bind_mounts=[(str(tmp_path), "/data", True),
                                          (str(config_file), "/etc/config.txt", False)]),
                  blocking_target(read_end))
    assert sorted(os.listdir(f"/proc/{child.pid}/root")) == ["data", "etc"]
    assert os.listdir(f"/proc/{child.pid}/root/etc") == ["config.txt"]
    mounts = {line.split()[4]: line.split()[5] for line in
              read(f"/proc/{child.pid}/mountinfo").splitlines()}
    assert set(mounts) == {"/", "/data", "/etc/config.txt"}
    assert mounts["/"].startswith("ro,") and "nosuid" in mounts["/data"]
    assert mounts["/data"].startswith("rw,") and mounts["/etc/config.txt"].startswith("ro,")
    os.write(write_end, b"\0")
    assert child.wait(timeout=10) == 0


def test_forbidden_syscall_is_reported_and_can_be_denied(jails, pipe):
    read_end, write_end = pipe

    def target() -> int:
        os.read(read_end, 1)
        try:
            os.open("/etc/passwd", os.O_RDONLY)
        except PermissionError:
            return 3
        return 4

    child = jails(JailConfig("deny", MINIMAL_POLICY, "notify", keep_fds=(read_end,)), target)
    assert child.listener_fd is not None
    os.write(write_end, b"x")
    violation = child.listener.receive(timeout=10)
    assert (violation.syscall, violation.pid) == ("openat", child.pid)
    assert child.listener.deny(violation, errno.EACCES)
    assert child.wait(timeout=10) == 3


def test_forbidden_syscall_can_be_let_through_from_a_thread(jails, pipe):
    """--seccomp-log-failures: a supervisor thread logs each violation and continues."""
    read_end, write_end = pipe

    def target() -> int:
        os.read(read_end, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # works: let through
            return 5 if s.family == socket.AF_INET else 6

    child = jails(JailConfig("continue", MINIMAL_POLICY, "notify", keep_fds=(read_end,)), target)
    logged = []

    def supervise() -> None:
        while (violation := child.listener.receive()) is not None:
            logged.append(violation)
            child.listener.allow(violation)

    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    os.write(write_end, b"x")
    assert child.wait(timeout=10) == 5
    supervisor.join(timeout=10)
    assert not supervisor.is_alive()  # receive() returned None once the child was gone
    socket_calls = [v for v in logged if v.syscall == "socket"]
    assert socket_calls and socket_calls[0].args[0] == socket.AF_INET
    assert all(v.pid == child.pid for v in logged)


async def test_violations_can_be_awaited_from_trio(jails, pipe):
    read_end, write_end = pipe

    def target() -> int:
        os.read(read_end, 1)
        return 7 if os.getppid() == 0 else 8  # getppid: forbidden, and 0 in a new pid ns

    child = jails(JailConfig("trio", MINIMAL_POLICY, "notify", keep_fds=(read_end,)), target)
    os.write(write_end, b"x")
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(child.listener)
        violation = child.listener.receive(timeout=0)
        assert violation.syscall == "getppid"
        child.listener.allow(violation)
        await trio.lowlevel.wait_readable(child)  # the pidfd: readable once it has exited
    assert child.poll() == 7


def test_kill_action_ends_the_child_with_sigsys(jails, pipe):
    read_end, write_end = pipe

    def target() -> int:
        os.read(read_end, 1)
        os.open("/", os.O_RDONLY)
        return 0

    child = jails(JailConfig("kill", MINIMAL_POLICY, "kill", keep_fds=(read_end,)), target)
    os.write(write_end, b"x")
    assert child.wait(timeout=10) == -signal.SIGSYS
    assert child.describe_exit() == "was killed by SIGSYS"


def test_log_action_lets_the_child_go_on(jails, pipe):
    read_end, write_end = pipe

    def target() -> int:
        os.read(read_end, 1)
        fd = os.open("/", os.O_RDONLY)  # forbidden, logged, and done
        os.close(fd)
        return 9

    child = jails(JailConfig("log", MINIMAL_POLICY, "log", keep_fds=(read_end,)), target)
    assert child.listener is None
    os.write(write_end, b"x")
    assert child.wait(timeout=10) == 9


def test_prepare_runs_before_the_root_changes_and_its_work_is_kept(tmp_path, pipe):
    read_end, report = pipe
    (tmp_path / "host_only_module.py").write_text("VALUE = 'imported from the host'\n")
    sys.path.insert(0, str(tmp_path))
    try:
        def target() -> None:
            import host_only_module  # noqa: F401 — already in sys.modules: prepare imported it
            try:
                os.close(os.open(str(tmp_path / "host_only_module.py"), os.O_RDONLY))
                seen = b"host files"
            except OSError:
                seen = b"no host files"
            os.write(report, host_only_module.VALUE.encode() + b", " + seen)

        child = spawn(JailConfig("prepared", WITH_OPENAT, "kill", keep_fds=(report,)), target,
                      prepare=lambda: __import__("host_only_module"))
        assert child.wait(timeout=10) == 0
        child.close()
        assert os.read(read_end, 100) == b"imported from the host, no host files"
        assert "host_only_module" not in sys.modules  # it ran in the child only
    finally:
        sys.path.remove(str(tmp_path))


def test_a_failing_prepare_is_a_one_line_jail_error():
    def prepare() -> None:
        raise ImportError("no module named\nnot_there")

    with pytest.raises(JailError, match="prepare: ImportError: no module named not_there") as caught:
        spawn(JailConfig("unprepared", MINIMAL_POLICY, "kill"), lambda: 0, prepare=prepare)
    assert "\n" not in str(caught.value)


def test_start_returns_while_the_child_prepares_and_finish_waits_for_it(pipe):
    read_end, write_end = pipe
    # prepare() waits for the test's byte: start() must return without it.
    starting = start(JailConfig("slow", MINIMAL_POLICY, "notify", keep_fds=(read_end,)), lambda: 0,
                     prepare=lambda: os.read(read_end, 1))
    try:
        assert select.select([starting], [], [], 0.2)[0] == []  # not jailed yet: nothing said
        assert starting.process.poll() is None
        os.write(write_end, b"x")
        child = starting.finish()
        assert child.listener_fd is not None  # the notify listener comes with finish()
        assert child.wait(timeout=10) == 0
    finally:
        starting.process.kill()
        starting.process.wait(timeout=10)
        starting.process.close()


def test_finish_reports_a_child_that_died_while_preparing():
    starting = start(JailConfig("dies", MINIMAL_POLICY, "kill"), lambda: 0,
                     prepare=lambda: os._exit(9))
    with pytest.raises(JailError, match="exited with status 9 while being jailed"):
        starting.finish()
    assert starting.process.returncode == 9


def test_uncaught_exception_exits_70_with_one_line(jails, capfd):
    def target() -> int:
        raise ValueError("the device core\nfailed")

    child = jails(JailConfig("crashy", MINIMAL_POLICY, "kill"), target)
    assert child.wait(timeout=10) == 70
    assert capfd.readouterr().err == \
        "jailed 'crashy': uncaught ValueError: the device core failed\n"


def test_sys_exit_and_return_values_become_the_exit_status(jails):
    child = jails(JailConfig("exits", MINIMAL_POLICY, "kill", keep_fds=()), lambda: sys.exit(3))
    assert child.wait(timeout=10) == 3
    child = jails(JailConfig("returns", MINIMAL_POLICY, "kill", keep_fds=()), lambda: None)
    assert child.wait(timeout=10) == 0


def test_child_dies_with_its_parent():
    helper = subprocess.Popen([sys.executable, "-m", "tests.jail.jailer_process"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(helper.stdout.readline().split()[1])
    pidfd = os.pidfd_open(pid)
    try:
        assert not select.select([pidfd], [], [], 0)[0]  # alive, blocked in read
        helper.stdin.write("die\n")
        helper.stdin.flush()
        assert helper.wait(timeout=10) == 0
        assert select.select([pidfd], [], [], 10)[0], "the jailed child outlived its parent"
    finally:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL) if not select.select(
            [pidfd], [], [], 0)[0] else None
        os.close(pidfd)


def run_jailer(*options: str, command: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "tests.jail.jailer_process", *options],
                            cwd=REPO, input=command + "\n", capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become uid 65534 (and this "
                                               "whole run is rootless anyway)")
def test_rootless_spawn_is_confined_and_supervised():
    helper = subprocess.Popen([sys.executable, "-m", "tests.jail.jailer_process", "--as-nobody"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = helper.stdout.readline().split()
        assert first[0] == "pid", first + [helper.stderr.read()]
        pid = int(first[1])
        assert proc_status(helper.pid)["Uid"].split() == ["65534"] * 4
        status = proc_status(pid)
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
        assert status["Uid"].split() == ["65534"] * 4
        assert read(f"/proc/{pid}/uid_map").split() == ["0", "65534", "1"]
        assert read(f"/proc/{pid}/setgroups").strip() == "deny"
        ours, its = namespace_ids("self"), namespace_ids(pid)
        assert all(ours[ns] != its[ns] for ns in ours)
        assert os.listdir(f"/proc/{pid}/root") == []
        helper.stdin.write("violation\n")
        helper.stdin.flush()
        assert helper.stdout.readline().split() == ["violation", "openat", str(pid)]
        assert helper.stdout.readline().split() == ["exit", "13"]
    finally:
        helper.kill()
        helper.communicate(timeout=10)


def test_without_user_namespaces_the_error_says_why():
    (line,) = run_jailer("--without-user-namespaces", command="release")
    assert line == ("error cannot start jailed 'jailer': cannot create a user namespace: "
                    "No space left on device (user.max_user_namespaces is 0)")


@pytest.mark.parametrize("change, message", [
    ({"violation_action": "trap"}, "violation action 'trap' is not one of kill, notify, log"),
    ({"keep_fds": (2, 987)}, "keep_fds has 987, which is not an open file descriptor"),
    ({"policy": parse_policy("read: 1\nclose: 1\n", "tiny.policy")},
     "policy tiny.policy must allow sendmsg, exit_group"),
    ({"bind_mounts": [("/tmp", "relative/path", False)]}, "must be an absolute path"),
    ({"bind_mounts": [("/tmp", "/a", False), ("/var", "/a/", True)]}, "two bind mounts on /a"),
    ({"bind_mounts": [("/no/such/dir", "/data", False)]},
     ("cannot start jailed 'bad': open a bind mount source: /no/such/dir: "
      "No such file or directory")),
    ({"bind_mounts": [("/usr", "/usr", False), ("/etc/hostname", "/usr/not-there/x", False)]},
     "bind mount target /usr/not-there/x does not exist inside an earlier bind mount"),
    ({"policy": POLICIES / "missing.policy"}, "cannot read policy"),
])
def test_errors_are_one_line_jail_errors(change, message):
    config = JailConfig(**{"name": "bad", "policy": MINIMAL_POLICY, "violation_action": "kill",
                           **change})
    with pytest.raises(JailError) as caught:
        spawn(config, lambda: 0)
    assert "\n" not in str(caught.value)
    assert message in str(caught.value), str(caught.value)


def test_a_policy_that_starves_the_handshake_is_a_clear_error():
    starving = parse_policy("sendmsg: 1\nclose: 1\nexit_group: 1\n", "starving.policy")
    # Allowed by name, but mmap/brk are missing: CPython needs memory right after the
    # filter is loaded and is killed; spawn() says so instead of hanging.
    try:
        child = spawn(JailConfig("starved", starving, "kill"), lambda: 0)
    except JailError as e:
        assert "was killed by SIGSYS while being jailed" in str(e) and "\n" not in str(e)
    else:  # CPython happened to need no new memory: then the child must run normally
        assert child.wait(timeout=10) == 0
        child.close()


def test_a_handshake_stuck_under_notify_times_out_with_a_reason():
    # sendmsg is listed but never matches: under "notify" the child's "ready" message
    # waits for a supervisor that does not exist yet.
    never_matching = parse_policy("sendmsg: arg2 == 0x4000\n").rules["sendmsg"]
    stuck = Policy({**load_policy(MINIMAL_POLICY).rules, "sendmsg": never_matching})
    started = time.monotonic()
    with pytest.raises(JailError, match="did not finish jailing itself in time"):
        spawn(JailConfig("stuck", stuck, "notify", start_timeout=0.5), lambda: 0)
    assert time.monotonic() - started < 5


def test_a_closed_process_can_still_be_killed_and_reaped(jails, pipe):
    read_end, _ = pipe
    child = jails(JailConfig("closed", MINIMAL_POLICY, "kill", keep_fds=(read_end,)),
                  blocking_target(read_end))
    child.close()
    with pytest.raises(ValueError, match=r"close\(\) released"):
        child.wait(timeout=1)  # waiting with a timeout needs the pidfd
    child.kill()  # by pid: it is not reaped yet, so the pid is still its own
    assert child.wait() == -signal.SIGKILL


def test_children_start_fast(jails):
    times = []
    for _ in range(10):
        started = time.perf_counter()
        child = jails(JailConfig("fast", MINIMAL_POLICY, "kill", keep_fds=()), lambda: 0)
        times.append(time.perf_counter() - started)
        assert child.wait(timeout=10) == 0
    print(f"spawn(): median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")
    assert max(times) < 1.0


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("keep", [{0}, {0, 1, 2}, {3}, {1, 5}])
def test_close_fds_except_keeps_exactly_the_given_fds(keep):
    from jail import close_fds_except

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # open a few fds, close all others, report which are left
        status = 1
        try:
            for _ in range(6):
                os.open("/dev/null", os.O_RDONLY)
            close_fds_except(frozenset(keep | {write_end}))
            left = [fd for fd in range(64) if is_open(fd)]
            os.write(write_end, repr(left).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    report = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert os.waitpid(pid, 0)[1] == 0
    assert eval(report) == sorted(keep | {write_end})
