"""Main's proxy of a device child, against a real (unjailed) child on the host: no KVM needed."""

import contextlib
import os
import queue
import select
import shutil
import struct
import time

import pytest

from sandvmm import protocol
from sandvmm.devices.rng.core import RngCore
from sandvmm.devices.virtio import shell
from sandvmm.devices.virtio import transport as virtio_pci
from sandvmm.main.device_proxy import MAX_POSTED_WRITES, Channels, DeviceProxy
from sandvmm.main.devices import POLICY_DIR, DeviceHost, DeviceSpec, ForkedProcess, SandboxOptions
from sandvmm.main.interrupts import IrqRouting
from sandvmm.memory import MiB, GuestMemory


class FakeVm:
    """Records what the proxy asks of KVM."""

    def __init__(self):
        self.irqfds = []
        self.ioevents = []

    def irqfd(self, fd, gsi, resample_fd=None):
        self.irqfds.append(gsi)

    def ioeventfd(self, fd, address, length, deassign=False):
        if deassign:
            self.ioevents.remove(address)
        else:
            self.ioevents.append(address)


@pytest.fixture
def proxy(monkeypatch):
    memory = GuestMemory(4 * MiB)
    parent, child = Channels.pairs()
    process = ForkedProcess(lambda: shell.serve(RngCore(os.urandom), memory, child.fds()), child.fds())
    child.close()
    vm = FakeVm()
    device = DeviceProxy("rng", vm, IrqRouting(vm), parent, intx_gsi=16)
    device.describe(virtio_pci.VirtioPciTransport(RngCore(os.urandom)))
    device.serve_irq()  # what the supervisor thread does for a real VM: the child registers
    device.serve_memory()  # its eventfds before it answers on the config channel
    calls = []
    real_call = protocol.call
    monkeypatch.setattr(protocol, "call", lambda sock, msg, fds=(): calls.append(msg) or real_call(sock, msg, fds))
    device.calls, device.process = calls, process
    yield device
    device.close()
    process.kill()
    try:
        os.waitpid(process.pid, 0)
    except ChildProcessError:
        pass  # the test reaped it
    process.close()
    memory.close()


def test_header_reads_are_answered_by_main_except_volatile_registers(proxy):
    transport = virtio_pci.VirtioPciTransport(RngCore(os.urandom))
    expected = transport.header()
    assert transport.volatile_registers() == [(virtio_pci.PCI_CFG_DATA, 4)]  # STATUS is static until DRIVER_OK
    for size in (1, 2, 4):
        for register in range(0, 256, size):
            if register < virtio_pci.PCI_CFG_DATA + 4 and virtio_pci.PCI_CFG_DATA < register + size:
                continue
            assert proxy.config_read(register, size) == expected[register:register + size]
    assert proxy.calls == []  # a whole scan of the header, and the child was never asked
    assert proxy.config_read(virtio_pci.PCI_CFG_DATA, 4) == bytes(4)  # the window reads the BAR: asked
    assert proxy.config_read(0x100, 4) == bytes(4)  # past the header: asked too
    assert [type(call).__name__ for call in proxy.calls] == ["ConfigRead", "ConfigRead"]


def set_driver_ok(proxy):
    """The driver's status dance on the common configuration, down to DRIVER_OK."""
    proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", virtio_pci.COMMAND_MEMORY | virtio_pci.COMMAND_BUS_MASTER))
    bar = lambda offset, value, size: proxy.bar_write(0, virtio_pci.COMMON_CFG_OFFSET + offset,  # noqa: E731
                                                     value.to_bytes(size, "little"))
    bar(virtio_pci.DEVICE_STATUS, virtio_pci.ACKNOWLEDGE | virtio_pci.DRIVER, 1)
    bar(virtio_pci.DRIVER_FEATURE_SELECT, 1, 4)
    bar(virtio_pci.DRIVER_FEATURE, 1, 4)  # VIRTIO_F_VERSION_1
    bar(virtio_pci.DEVICE_STATUS, virtio_pci.ACKNOWLEDGE | virtio_pci.DRIVER | virtio_pci.FEATURES_OK, 1)
    bar(virtio_pci.DEVICE_STATUS, virtio_pci.ACKNOWLEDGE | virtio_pci.DRIVER | virtio_pci.FEATURES_OK
        | virtio_pci.DRIVER_OK, 1)


def test_status_is_asked_for_once_intx_can_be_asserted_and_not_under_msix(proxy):
    set_driver_ok(proxy)
    proxy.calls.clear()
    proxy.config_read(virtio_pci.STATUS, 2)
    assert [type(call).__name__ for call in proxy.calls] == ["ConfigRead"]  # INTx mode, driver OK: live
    proxy.config_write(virtio_pci.CAP_MSIX_CONTROL, struct.pack("<H", virtio_pci.MSIX_ENABLE))
    proxy.calls.clear()
    assert struct.unpack("<H", proxy.config_read(virtio_pci.STATUS, 2))[0] & virtio_pci.STATUS_INTERRUPT == 0
    assert proxy.calls == []  # under MSI-X the interrupt bit stays clear: the mirror answers


def test_writes_reach_the_child_and_refresh_the_mirror(proxy):
    proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", 0xFFFF))  # only writable bits stick
    command = virtio_pci.COMMAND_IO | virtio_pci.COMMAND_MEMORY | virtio_pci.COMMAND_BUS_MASTER \
        | virtio_pci.COMMAND_INTX_DISABLE
    assert proxy.config_read(virtio_pci.COMMAND, 2) == struct.pack("<H", command)
    proxy.config_write(virtio_pci.CAP_MSIX_CONTROL, struct.pack("<H", virtio_pci.MSIX_ENABLE))
    control = struct.unpack("<H", proxy.config_read(virtio_pci.CAP_MSIX_CONTROL, 2))[0]
    assert control & virtio_pci.MSIX_ENABLE and control & 0x7FF == 1  # enabled; two vectors (table size - 1)
    proxy.config_write(virtio_pci.CAPABILITIES_POINTER, b"\x00")  # read-only: the mirror keeps the chain
    assert proxy.config_read(virtio_pci.CAPABILITIES_POINTER, 1) == bytes([virtio_pci.CAP_MSIX])
    assert [type(call).__name__ for call in proxy.calls] == ["ConfigWrite"] * 3  # the reads asked nothing


def test_a_dead_child_reads_as_all_ones_where_asked_and_keeps_its_mirror(proxy):
    gone = []
    proxy.on_gone = lambda name, why: gone.append(name)
    proxy.process.kill()
    os.waitpid(proxy.process.pid, 0)
    assert proxy.config_read(virtio_pci.PCI_CFG_DATA, 4) == b"\xff" * 4
    assert gone == ["rng"]
    assert proxy.config_read(0, 2) == struct.pack("<H", virtio_pci.VIRTIO_VENDOR_ID)
    proxy.config_write(virtio_pci.COMMAND, b"\x00\x00")  # no exception: the VM is being stopped anyway


def _sandbox_without_eventfd2(tmp_path, log_failures):
    """Policies under which the shell breaks its policy first thing (it makes eventfds)."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy_dir)
    common = policy_dir / "common_device.policy"
    common.write_text("".join(line for line in common.read_text().splitlines(keepends=True)
                              if not line.startswith("eventfd2:")))
    return SandboxOptions(policy_dir=policy_dir, log_failures=log_failures)


@contextlib.contextmanager
def rng_child(options: SandboxOptions, on_failure=lambda why: None):
    """(host, proxy, vm): an rng child launched (host.start() supervises it), stopped at the end."""
    host = DeviceHost(options, on_failure=on_failure)
    memory = GuestMemory(4 * MiB)
    vm = FakeVm()
    try:
        proxy = host.launch(DeviceSpec("rng", RngCore(os.urandom)), memory,
                            lambda channels: DeviceProxy("rng", vm, IrqRouting(vm), channels, 16))
        yield host, proxy, vm
    finally:
        host.stop()
        memory.close()


@pytest.mark.parametrize("log_failures", [False, True])
def test_a_child_breaking_its_policy_while_starting_is_stopped_or_logged_not_waited_for(tmp_path, log_failures):
    """The supervisor collects the starting child's seccomp listener and answers it."""
    failures = queue.Queue()
    started = time.monotonic()
    with rng_child(_sandbox_without_eventfd2(tmp_path, log_failures), failures.put) as (host, proxy, _):
        assert time.monotonic() - started < 5  # launch() did not wait for the child
        host.start()
        if log_failures:  # let through: the child runs and answers a write
            proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", virtio_pci.COMMAND_MEMORY))
            assert struct.unpack("<H", proxy.config_read(virtio_pci.COMMAND, 2))[0] == virtio_pci.COMMAND_MEMORY
            assert failures.empty()
        else:
            assert failures.get(timeout=10) == "device rng was stopped by its seccomp policy (eventfd2)"
    assert time.monotonic() - started < 10


def test_a_child_that_cannot_start_stops_the_vm_with_a_reason(tmp_path, monkeypatch):
    import sandvmm.main.devices as devices

    def broken_import() -> None:
        raise ImportError("no module named trio")

    monkeypatch.setattr(devices, "_import_device_loop", broken_import)
    failures = queue.Queue()
    with rng_child(SandboxOptions(), failures.put) as (host, proxy, _):
        host.start()
        started = time.monotonic()
        host.wait_started()  # a one-CPU host waits here before its vCPUs: the failure ends the wait
        assert time.monotonic() - started < 10 and not proxy.started.is_set()
        reason = failures.get(timeout=10)
        assert reason.startswith("device rng failed to start: cannot start jailed 'sandvmm-rng': prepare: "
                                 "ImportError: no module named trio"), reason
        # A vCPU that asks the dead child gets all-ones, not a hang.
        assert proxy.config_read(virtio_pci.PCI_CFG_DATA, 4) == b"\xff" * 4


def test_a_guest_access_waits_for_a_starting_child_and_ioevents_follow_an_early_mapping(tmp_path):
    """The vCPUs run before the children are up: reads come from main, writes wait."""
    with rng_child(SandboxOptions(enabled=False)) as (host, proxy, vm):
        assert proxy.config_read(0, 2) == struct.pack("<H", virtio_pci.VIRTIO_VENDOR_ID)  # no child needed
        proxy.bar_mapped(virtio_pci.BAR_INDEX, 0xE000_0000)  # the guest maps the BAR before the child registered
        host.start()  # the supervisor serves the child's registrations
        host.wait_started()
        assert proxy.started.is_set()
        proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", virtio_pci.COMMAND_MEMORY))  # waits for the child
        deadline = time.monotonic() + 10
        while not vm.ioevents and time.monotonic() < deadline:
            time.sleep(0.01)
        transport = virtio_pci.VirtioPciTransport(RngCore(os.urandom))
        assert vm.ioevents == [0xE000_0000 + transport.notify_offset(0)]


@pytest.mark.parametrize("cpus, policy", [(1, os.SCHED_BATCH), (2, os.SCHED_OTHER)])
def test_with_one_cpu_children_do_not_preempt_the_guest_when_kicked(monkeypatch, cpus, policy):
    monkeypatch.setattr("sandvmm.main.devices.host_cpus", lambda: cpus)
    with rng_child(SandboxOptions(enabled=False)) as (host, _, _):
        assert os.sched_getscheduler(host.devices[0].process.pid) == policy


def test_bar_writes_are_posted_and_a_later_read_sees_them_all(proxy):
    proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", virtio_pci.COMMAND_MEMORY))
    select = virtio_pci.COMMON_CFG_OFFSET + virtio_pci.DEVICE_FEATURE_SELECT
    for value in range(100):  # more than MAX_POSTED_WRITES: main reads answers as it goes
        proxy.bar_write(0, select, struct.pack("<I", value % 2))
        assert proxy.posted <= MAX_POSTED_WRITES
    proxy.calls.clear()
    assert proxy.bar_read(0, select, 4) == struct.pack("<I", 1)  # the last write is done before the read
    assert [type(call).__name__ for call in proxy.calls] == ["BarRead"] and proxy.posted == 0


def test_a_posted_write_to_a_dead_child_is_dropped_and_reported(proxy):
    gone = []
    proxy.on_gone = lambda name, why: gone.append(name)
    proxy.process.kill()
    os.waitpid(proxy.process.pid, 0)
    proxy.bar_write(0, virtio_pci.COMMON_CFG_OFFSET, b"\0\0\0\0")  # no exception, no hang
    assert proxy.bar_read(0, virtio_pci.COMMON_CFG_OFFSET, 4) == b"\xff" * 4
    assert gone and set(gone) == {"rng"}


def test_a_jailed_child_waits_for_kicks_in_a_thread_its_policy_allows():
    """Every device child serves its kicks in a thread it starts after the jail: its own
    policy, with the kill action, must allow all that thread does."""
    failures = queue.Queue()
    with rng_child(SandboxOptions(), failures.put) as (host, proxy, _):
        host.start()
        proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", virtio_pci.COMMAND_MEMORY))  # the child runs
        (kick,) = [fd for group in proxy.ioevents for fd in group.fds]
        for _ in range(3):  # no queue is set up: the thread wakes, reads the kick, finds nothing
            os.eventfd_write(kick, 1)
            time.sleep(0.2)
            assert not select.select([kick], [], [], 0)[0]  # the kick was read: the counter is back at 0
        proxy.config_write(virtio_pci.COMMAND, struct.pack("<H", 0))
        try:
            failure = failures.get(timeout=1)
        except queue.Empty:
            failure = None
        assert failure is None
