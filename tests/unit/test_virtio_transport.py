"""The virtio-pci transport core, driven the way Linux's virtio_pci_modern driver drives it."""

import pytest

from sandvmm.devices.virtio import transport as vp
from tests.unit.transport_rig import (
    MAX_SIZES, MSI_ADDRESS, OFFERED, VERSION_1, FakeConsole, expected_activation, linux_probe, new, probed,
)


def test_header_identifies_a_modern_virtio_device():
    _, guest = new()
    assert guest.cfg(0x00) == (0x1040 + 3) << 16 | 0x1AF4
    assert guest.cfg(0x08) == 0x078000 << 8 | 1  # communication/other, revision 1
    assert guest.cfg(0x0E, 1) == 0  # type-0 header, single function
    assert guest.cfg(0x2C) == 0x40 << 16 | 0x1AF4
    assert guest.cfg(vp.STATUS, 2) == vp.STATUS_CAPABILITIES
    assert guest.cfg(vp.INTERRUPT_PIN, 1) == 1
    assert [guest.cfg(register) for register in range(0x10, 0x28, 4)] + [guest.cfg(0x30)] == [0] * 7


@pytest.mark.parametrize("device_type, class_code", [(2, 0x010000), (1, 0x020000), (4, 0xFF0000)])
def test_class_code_follows_device_type(device_type, class_code):
    device = FakeConsole()
    device.device_type = device_type
    assert new(device)[1].cfg(0x08) >> 8 == class_code


def test_capabilities_are_what_vp_modern_probe_needs():
    transport, guest = new()
    caps = guest.capabilities()
    assert set(caps) == {vp.PCI_CAP_ID_MSIX} | {("virtio", cfg_type) for cfg_type in range(1, 6)}
    _, bar, offset, length = guest.virtio_cap(vp.VIRTIO_PCI_CAP_COMMON_CFG)
    assert (bar, offset % 4) == (0, 0) and 0x38 <= length and offset + length <= transport.BAR_SIZE
    position, bar, offset, length = guest.virtio_cap(vp.VIRTIO_PCI_CAP_NOTIFY_CFG)
    multiplier = guest.cfg(position + 16)
    assert guest.cfg(position + 2, 1) == 20 and multiplier == 4
    assert length >= (len(MAX_SIZES) - 1) * multiplier + 2  # 4.1.4.4.1
    assert [offset + multiplier * i for i in range(2)] == [transport.notify_offset(i) for i in range(2)]
    assert guest.virtio_cap(vp.VIRTIO_PCI_CAP_ISR_CFG)[1:] == (0, vp.ISR_CFG_OFFSET, 1)
    assert guest.virtio_cap(vp.VIRTIO_PCI_CAP_DEVICE_CFG)[1:3] == (0, vp.DEVICE_CFG_OFFSET)
    msix = caps[vp.PCI_CAP_ID_MSIX]
    assert (guest.cfg(msix + 2, 2) & 0x7FF) + 1 == len(MAX_SIZES) + 1
    assert (guest.cfg(msix + 4), guest.cfg(msix + 8)) == (vp.MSIX_TABLE_OFFSET, vp.MSIX_PBA_OFFSET)  # BIR 0


def test_only_writable_config_bits_change():
    transport, guest = new()
    before = transport.config_read(0, 256)
    for register in range(0, 256, 4):
        guest.set_cfg(register, 0xFFFFFFFF)
    after = transport.config_read(0, 256)
    changed = {offset for offset in range(256) if before[offset] != after[offset]}
    window = {vp.PCI_CFG_BAR, *range(vp.PCI_CFG_OFFSET, vp.PCI_CFG_DATA + 4)}
    assert changed == {vp.COMMAND, vp.COMMAND + 1, vp.INTERRUPT_LINE, vp.CAP_MSIX_CONTROL + 1} | window
    assert guest.cfg(vp.COMMAND, 2) == 0x0407
    assert guest.cfg(vp.CAP_MSIX_CONTROL, 2) == 0xC000 | len(MAX_SIZES)
    assert transport.config_read(0x100, 4) == bytes(4) and transport.config_read(0xFFE, 2) == bytes(2)
    assert transport.config_read(0xFFE, 4) == bytes(4)  # past the end: zeros, no exception
    assert transport.config_write(0x100, b"\xff" * 4) == [] and transport.config_read(0x100, 4) == bytes(4)


def test_device_models_the_transport_cannot_serve_are_refused_at_construction():
    for attribute, value in (("features", 1 << 34), ("queue_max_sizes", (100,)), ("device_type", 0x40)):
        device = FakeConsole()
        setattr(device, attribute, value)
        with pytest.raises(ValueError):
            vp.VirtioPciTransport(device)


# --- the Linux probe and the status field -------------------------------------------------------
def test_linux_probe_with_msix():
    transport, guest = new()
    effects = linux_probe(guest)
    # One route per vector, when request_irq unmasks it with its final message.
    routes = [vp.MsiRouteChanged(vector, MSI_ADDRESS, 0x40 + vector) for vector in range(3)]
    assert effects == [vp.Reset(), vp.InterruptModeChanged(True), *routes, expected_activation()]
    assert transport.negotiated_features == OFFERED
    assert transport.status == vp.ACKNOWLEDGE | vp.DRIVER | vp.FEATURES_OK | vp.DRIVER_OK
    assert (transport.queue_interrupt(0), transport.queue_interrupt(1)) == (vp.MsiVector(1), vp.MsiVector(2))
    assert transport.isr == 0  # queue interrupts under MSI-X leave the ISR alone
    assert transport.config_interrupt() == vp.MsiVector(0)
    assert transport.bar_write(0, transport.notify_offset(1), b"\x01\x00") == [vp.QueueNotified(1)]
    assert guest.add_status(vp.DRIVER_OK) == []  # activation happens once


def test_driver_may_enable_only_some_queues():
    assert linux_probe(new()[1], msix=False, queue_sizes=(128,))[-1] == expected_activation(sizes=(128,))


@pytest.mark.parametrize("features", [OFFERED & ~VERSION_1, OFFERED | 1 << 5, OFFERED | 1 << 40])
def test_feature_refusal(features):
    transport, guest = new()
    assert linux_probe(guest, features=features) == [vp.Reset()]
    assert guest.read(vp.DEVICE_STATUS, 1) == vp.ACKNOWLEDGE | vp.DRIVER | vp.FAILED
    assert transport.negotiated_features is None
    guest.write(vp.DRIVER_FEATURE_SELECT, 0)
    guest.write(vp.DRIVER_FEATURE, 0)  # acceptable features now (only VERSION_1), but FAILED
    guest.add_status(vp.FEATURES_OK | vp.DRIVER_OK)  # stands until a reset
    assert transport.status == vp.ACKNOWLEDGE | vp.DRIVER | vp.FAILED


def test_features_freeze_at_features_ok_and_nothing_runs_before_driver_ok():
    transport, guest = new()
    guest.write(vp.DRIVER_FEATURE_SELECT, 1)
    guest.write(vp.DRIVER_FEATURE, 1)
    assert guest.add_status(vp.ACKNOWLEDGE | vp.DRIVER | vp.DRIVER_OK) == []
    assert transport.status == vp.ACKNOWLEDGE | vp.DRIVER  # DRIVER_OK without FEATURES_OK does not stick
    guest.add_status(vp.FEATURES_OK)
    guest.write(vp.DRIVER_FEATURE, 3)  # too late
    assert guest.read(vp.DRIVER_FEATURE) == 1 and transport.negotiated_features == VERSION_1
    guest.write(vp.DRIVER_FEATURE_SELECT, 2)
    guest.write(vp.DEVICE_FEATURE_SELECT, 2)
    assert guest.read(vp.DRIVER_FEATURE) == guest.read(vp.DEVICE_FEATURE) == 0
    guest.write(vp.QUEUE_ENABLE, 1, 2)
    assert transport.queue_interrupt(0) is None and transport.isr == 0
    assert guest.add_status(vp.DRIVER_OK) == [vp.Activated(VERSION_1, {0: vp.QueueConfig(256, 0, 0, 0)})]
    assert transport.queue_interrupt(0) == vp.Intx()


def test_reset_clears_queues_vectors_features_and_isr_but_not_pci_state():
    transport, guest = probed()
    transport.config_interrupt()
    generation = guest.read(vp.CONFIG_GENERATION, 1)
    table = transport.bar_read(0, vp.MSIX_TABLE_OFFSET, 8)
    assert transport.isr == vp.ISR_CONFIG and transport.status
    assert guest.write(vp.DEVICE_STATUS, 0, 1) == [vp.Reset()]
    assert guest.read(vp.DEVICE_STATUS, 1) == transport.isr == 0
    assert guest.read(vp.CONFIG_MSIX_VECTOR, 2) == vp.NO_VECTOR
    for field, width in ((vp.DRIVER_FEATURE_SELECT, 4), (vp.DEVICE_FEATURE_SELECT, 4), (vp.DRIVER_FEATURE, 4),
                         (vp.QUEUE_SELECT, 2)):
        assert guest.read(field, width) == 0
    for index, max_size in enumerate(MAX_SIZES):
        guest.write(vp.QUEUE_SELECT, index, 2)
        fields = [guest.read(field, 2) for field in (vp.QUEUE_SIZE, vp.QUEUE_MSIX_VECTOR, vp.QUEUE_ENABLE)]
        assert fields == [max_size, vp.NO_VECTOR, 0]
        assert [guest.read(field, 8) for field in (vp.QUEUE_DESC, vp.QUEUE_DRIVER, vp.QUEUE_DEVICE)] == [0] * 3
    assert guest.read(vp.CONFIG_GENERATION, 1) == generation  # never goes back
    assert transport.msix_enabled and transport.bar_read(0, vp.MSIX_TABLE_OFFSET, 8) == table
    assert transport.queue_interrupt(0) is None  # no notifications for a reset device
    assert linux_probe(guest)[-1] == expected_activation()  # and it comes back


# --- common and device configuration --------------------------------------------------------------
def test_queue_fields_accept_only_valid_values():
    _, guest = new()
    for bad in (0, 3, 512, 0xFFFF):
        guest.write(vp.QUEUE_SIZE, bad, 2)
        assert guest.read(vp.QUEUE_SIZE, 2) == 256
    guest.write(vp.QUEUE_SIZE, 1, 2)
    assert guest.read(vp.QUEUE_SIZE, 2) == 1
    for bad in (3, vp.NO_VECTOR - 1):  # the table has vectors 0-2
        guest.write(vp.QUEUE_MSIX_VECTOR, bad, 2)
        guest.write(vp.CONFIG_MSIX_VECTOR, bad, 2)
        assert guest.read(vp.QUEUE_MSIX_VECTOR, 2) == guest.read(vp.CONFIG_MSIX_VECTOR, 2) == vp.NO_VECTOR
    guest.write(vp.QUEUE_ENABLE, 0, 2)
    guest.write(vp.QUEUE_ENABLE, 2, 2)
    assert guest.read(vp.QUEUE_ENABLE, 2) == 0
    guest.write(vp.QUEUE_DESC, 0x1122334455667788, 8)
    guest.write(vp.QUEUE_DESC + 4, 0xAABBCCDD)
    assert guest.read(vp.QUEUE_DESC, 8) == 0xAABBCCDD55667788
    guest.write(vp.QUEUE_ENABLE, 1, 2)
    guest.write(vp.QUEUE_SIZE, 64, 2)
    guest.write(vp.QUEUE_DESC, 0)
    assert (guest.read(vp.QUEUE_SIZE, 2), guest.read(vp.QUEUE_DESC, 8)) == (1, 0xAABBCCDD55667788)
    guest.write(vp.QUEUE_SELECT, 2, 2)  # no such queue
    assert (guest.read(vp.QUEUE_SIZE, 2), guest.read(vp.QUEUE_MSIX_VECTOR, 2)) == (0, vp.NO_VECTOR)
    guest.write(vp.QUEUE_ENABLE, 1, 2)
    guest.write(vp.QUEUE_SELECT, 1, 2)
    assert guest.read(vp.QUEUE_ENABLE, 2) == 0


def test_accesses_of_the_wrong_width_are_ignored():
    transport, guest = new()
    guest.write(vp.QUEUE_SELECT, 1, 1)  # half a 16-bit field
    guest.write(vp.DEVICE_STATUS, vp.ACKNOWLEDGE, 2)  # status and config_generation at once
    guest.write(vp.QUEUE_SIZE - 1, 0xFFFF, 2)  # misaligned
    guest.write(vp.QUEUE_SIZE, 64)  # queue_size and queue_msix_vector in one go
    guest.write(vp.QUEUE_DESC + 2, 0xFFFFFFFF)
    assert (guest.read(vp.QUEUE_SELECT, 2), transport.status) == (0, 0)
    assert (guest.read(vp.QUEUE_SIZE, 2), guest.read(vp.QUEUE_DESC, 8)) == (256, 0)
    guest.write(vp.QUEUE_SELECT, 1, 2)
    guest.write(vp.DEVICE_STATUS, vp.ACKNOWLEDGE, 1)
    assert guest.read(vp.DEVICE_STATUS) == 1 << 16 | vp.ACKNOWLEDGE  # reads see fields as laid out
    assert transport.bar_read(0, vp.REGION_SIZE - 2, 4) == bytes(4)  # straddles two regions


def test_config_generation_changes_once_for_any_number_of_changes():
    transport, guest = probed()
    before = guest.read(vp.CONFIG_GENERATION, 1)
    for _ in range(256):  # a plain counter would wrap back to `before`
        transport.config_interrupt()
    assert guest.read(vp.CONFIG_GENERATION, 1) == before  # not yet: nothing stale was read
    assert guest.read(vp.DEVICE_CFG_OFFSET, 2) == 80
    changed = guest.read(vp.CONFIG_GENERATION, 1)
    assert changed != before
    guest.read(vp.DEVICE_CFG_OFFSET + 2, 2)
    assert guest.read(vp.CONFIG_GENERATION, 1) == changed


def test_device_config_passes_through_and_pads():
    device = FakeConsole()
    transport, guest = new(device)
    assert guest.read(vp.DEVICE_CFG_OFFSET + 4, 8) == 0x12345678 << 32 | 1
    assert transport.bar_read(0, vp.DEVICE_CFG_OFFSET + 10, 8) == b"\x34\x12" + bytes(6)  # model answers short
    assert guest.write(vp.DEVICE_CFG_OFFSET + 8, 7) == [] and device.writes == [(8, b"\x07\0\0\0")]


def test_config_interrupts_wait_for_driver_ok():
    transport, guest = new()
    assert transport.config_interrupt() is None and transport.isr == 0
    assert transport.needs_reset() is None
    assert transport.status == vp.DEVICE_NEEDS_RESET
    guest.write(vp.DEVICE_STATUS, 0, 1)
    assert transport.status == 0  # the reset cures it
    guest.write(vp.DEVICE_STATUS, vp.DEVICE_NEEDS_RESET | 0x30 | vp.ACKNOWLEDGE, 1)
    assert transport.status == vp.ACKNOWLEDGE  # the driver sets neither the device's bit nor reserved ones


def test_needs_reset_notifies_once():
    transport, guest = probed()
    assert transport.needs_reset() == vp.MsiVector(0)
    assert guest.read(vp.DEVICE_STATUS, 1) & vp.DEVICE_NEEDS_RESET
    assert transport.needs_reset() is None
    guest.write(vp.DEVICE_STATUS, vp.DRIVER_OK, 1)  # the driver cannot clear it
    assert transport.status & vp.DEVICE_NEEDS_RESET


# --- MSI-X --------------------------------------------------------------------------------------
def test_masked_vector_pends_and_fires_on_unmask():
    transport, guest = probed()
    control = vp.MSIX_TABLE_OFFSET + 16 * 1 + 12
    assert guest.write(control, 1) == []
    assert transport.queue_interrupt(0) is None
    assert guest.read(vp.MSIX_PBA_OFFSET, 8) == 1 << 1
    assert guest.write(vp.MSIX_PBA_OFFSET, 0, 8) == [] and guest.read(vp.MSIX_PBA_OFFSET, 8) == 1 << 1
    assert guest.write(control, 0) == [vp.FirePending(1)]
    assert guest.read(vp.MSIX_PBA_OFFSET, 8) == 0
    assert guest.write(control, 0) == []  # nothing pending any more
    guest.write(control, 1)
    transport.queue_interrupt(0)
    guest.write(vp.DEVICE_STATUS, 0, 1)  # the interrupt belonged to the old incarnation
    assert guest.read(vp.MSIX_PBA_OFFSET, 8) == 0 and guest.write(control, 0) == []


def test_function_mask_pends_every_vector():
    transport, guest = probed()
    guest.set_cfg(guest.msix_control(), vp.MSIX_ENABLE | vp.MSIX_FUNCTION_MASK, 2)
    assert (transport.config_interrupt(), transport.queue_interrupt(1)) == (None, None)
    assert guest.read(vp.MSIX_PBA_OFFSET, 8) == 0b101
    guest.write(vp.MSIX_TABLE_OFFSET + 12, 1)  # vector 0 is also masked on its own
    assert guest.set_cfg(guest.msix_control(), vp.MSIX_ENABLE, 2) == [vp.FirePending(2)]
    assert guest.write(vp.MSIX_TABLE_OFFSET + 12, 0) == [vp.FirePending(0)]


def test_no_vector_and_no_bus_master_deliver_nothing():
    transport, guest = probed()
    guest.write(vp.QUEUE_SELECT, 0, 2)
    guest.write(vp.QUEUE_MSIX_VECTOR, vp.NO_VECTOR, 2)  # vectors stay remappable
    assert transport.queue_interrupt(0) is None
    guest.command(clear_bits=vp.COMMAND_BUS_MASTER)
    assert transport.queue_interrupt(1) is None
    assert guest.read(vp.MSIX_PBA_OFFSET, 8) == transport.isr == 0  # dropped, not pending


def test_a_route_changes_when_an_unmasked_vector_gets_a_new_message():
    _, guest = new()
    entry = vp.MSIX_TABLE_OFFSET + 16 * 2
    assert guest.write(entry, 0xFEE01000 << 32 | 0xFEE00003, 8) == []  # masked: entries start masked
    assert guest.write(entry + 8, 5) == []
    assert guest.write(entry + 12, 0xFFFFFFFE) == \
        [vp.MsiRouteChanged(2, 0xFEE01000 << 32 | 0xFEE00000, 5)]  # low address bits are hardwired 0
    assert guest.read(entry + 12) == 0  # reserved control bits stay zero
    assert guest.write(entry + 8, 5) == []  # the same message: nothing to re-route
    assert guest.write(entry + 8, 6) == [vp.MsiRouteChanged(2, 0xFEE01000 << 32 | 0xFEE00000, 6)]
    assert guest.write(entry + 12, 1) == [] and guest.write(entry + 8, 7) == []  # masked again
    assert guest.write(entry + 12, 0) == [vp.MsiRouteChanged(2, 0xFEE01000 << 32 | 0xFEE00000, 7)]
    assert guest.write(vp.MSIX_TABLE_OFFSET + 16 * 3, 1) == []  # past the table


# --- INTx -----------------------------------------------------------------------------------------
def test_intx_path_and_isr_read_to_clear():
    transport, guest = new()
    assert linux_probe(guest, msix=False) == [vp.Reset(), expected_activation()]
    assert transport.queue_interrupt(0) == vp.Intx() and transport.intx_asserted
    assert guest.cfg(vp.STATUS, 2) & vp.STATUS_INTERRUPT
    assert transport.config_interrupt() == vp.Intx()
    assert guest.read(vp.ISR_CFG_OFFSET, 1) == vp.ISR_QUEUE | vp.ISR_CONFIG
    assert guest.read(vp.ISR_CFG_OFFSET, 1) == 0
    assert not transport.intx_asserted and not guest.cfg(vp.STATUS, 2) & vp.STATUS_INTERRUPT


def test_intx_disable_holds_the_interrupt_in_isr():
    transport, guest = probed(msix=False)
    guest.command(set_bits=vp.COMMAND_INTX_DISABLE)
    assert transport.queue_interrupt(0) is None and transport.isr == vp.ISR_QUEUE
    assert guest.cfg(vp.STATUS, 2) & vp.STATUS_INTERRUPT  # the status bit shows it regardless
    assert guest.command(clear_bits=vp.COMMAND_INTX_DISABLE) == [vp.FireIntx()]


def test_disabling_msix_falls_back_to_intx():
    transport, guest = probed()
    assert transport.config_interrupt() == vp.MsiVector(0)  # sets ISR's config bit even so
    guest.command(clear_bits=vp.COMMAND_INTX_DISABLE)
    assert guest.set_cfg(guest.msix_control(), 0, 2) == [vp.InterruptModeChanged(False), vp.FireIntx()]
    assert transport.queue_interrupt(0) == vp.Intx()


# --- notify and the pci_cfg window ------------------------------------------------------------
def test_notify_writes_name_their_queue():
    transport, guest = new()
    assert [guest.write(transport.notify_offset(index), index, 2) for index in (0, 1)] == \
        [[vp.QueueNotified(0)], [vp.QueueNotified(1)]]
    assert guest.write(transport.notify_offset(1) + 2, 1, 2) == []
    assert guest.write(transport.notify_offset(1) + 4, 2, 2) == []  # no queue 2
    assert guest.read(transport.notify_offset(0), 2) == 0
    with pytest.raises(ValueError):
        transport.notify_offset(2)


def test_bar_is_dead_while_memory_decoding_is_off():
    transport, guest = new(decoding=False)
    assert transport.bar_read(0, vp.DEVICE_STATUS, 1) == b"\xff"
    assert guest.write(vp.DEVICE_STATUS, 0, 1) == guest.write(transport.notify_offset(0), 0, 2) == []
    guest.command(set_bits=vp.COMMAND_MEMORY)
    assert transport.bar_read(1, 0, 4) == bytes(4)  # there is only BAR0


def test_pci_cfg_window_reaches_the_bar():
    device = FakeConsole()
    transport, guest = new(device, decoding=False)  # the window does not need memory decoding
    position = guest.virtio_cap(vp.VIRTIO_PCI_CAP_PCI_CFG)[0]
    data = position + 16

    def aim(offset, length, bar=0):
        guest.set_cfg(position + 4, bar, 1)
        guest.set_cfg(position + 8, offset)
        guest.set_cfg(position + 12, length)

    aim(vp.DEVICE_STATUS, 1)
    assert guest.set_cfg(data, vp.ACKNOWLEDGE, 1) == [] and transport.status == vp.ACKNOWLEDGE
    assert guest.cfg(data, 1) == vp.ACKNOWLEDGE
    assert guest.set_cfg(data, 0, 1) == [vp.Reset()]
    aim(vp.DEVICE_CFG_OFFSET, 4)
    assert guest.cfg(data) == 25 << 16 | 80
    aim(transport.notify_offset(1), 2)
    assert guest.set_cfg(data, 1, 2) == [vp.QueueNotified(1)]
    linux_probe(guest, msix=False)
    transport.queue_interrupt(0)
    aim(vp.ISR_CFG_OFFSET, 1)
    assert guest.cfg(data, 1) == vp.ISR_QUEUE and transport.isr == 0
    # Refused: wrong length, misaligned, outside the virtio structures, another BAR. The data
    # register then just keeps what was written, and nothing reaches the BAR.
    for offset, length, bar in ((vp.DEVICE_CFG_OFFSET, 3, 0), (vp.DEVICE_CFG_OFFSET + 2, 4, 0),
                                (vp.MSIX_TABLE_OFFSET, 4, 0), (vp.ISR_CFG_OFFSET + 4, 4, 0),
                                (vp.DEVICE_CFG_OFFSET, 4, 1)):
        aim(offset, length, bar)
        assert guest.set_cfg(data, 0xFFFFFFFF) == [] and guest.cfg(data) == 0xFFFFFFFF
    assert device.writes == [] and guest.read(vp.MSIX_TABLE_OFFSET) == 0
