"""The virtio-pci transport core against anything a guest may do: a real driver's writes
replayed amid random accesses (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sandvmm.devices.virtio import transport as vp
from tests.unit.transport_rig import MAX_SIZES, MSI_ADDRESS, OFFERED, VERSION_1, Guest, linux_probe, new


def recorded_probe(msix):
    """The writes linux_probe makes, as operations to replay."""
    transport, guest = new()
    writes, config_write, bar_write = [], transport.config_write, transport.bar_write
    transport.config_write = lambda *access: writes.append(("config_write", *access)) or config_write(*access)
    transport.bar_write = lambda *access: writes.append(("bar_write", *access)) or bar_write(*access)
    linux_probe(guest, msix=msix)
    return writes


# A real driver's writes, replayed one per "driver_step" amid random accesses, so that every
# stage of negotiation and queue setup meets arbitrary interference.
DRIVER_WRITES = {msix: recorded_probe(msix) for msix in (False, True)}
VALUES = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xB, 0xF, 0x40, 0x8F, 0xFF, 64, 128, 256, 512,
                                    0x7FFF, 0xFFFF, MSI_ADDRESS, OFFERED & 0xFFFFFFFF, 0xFFFFFFFF]),
                   st.integers(0, 2 ** 64 - 1))


def encode(value, size):
    return (value & (1 << 8 * size) - 1).to_bytes(size, "little")


def field_writes(kind, fields):
    """Whole fields at their own width with values that mean something to them (and, now and
    then, any value). One strategy per call: hypothesis weighs it as one choice however
    many fields it lists."""
    def write(index, choice, any_value):
        offset, width, meaningful = fields[index]
        data = encode(meaningful[choice % len(meaningful)] if any_value is None else any_value, width)
        return (kind, 0, offset, data) if kind == "bar_write" else (kind, offset, data)
    return st.builds(write, st.integers(0, len(fields) - 1), st.integers(0, 63),
                     st.one_of(st.none(), st.none(), VALUES))


STATUS_VALUES = [0, vp.ACKNOWLEDGE, 3, 0xB, 0xF, 0x8F, vp.DRIVER_OK, vp.FEATURES_OK]
VECTORS = [0, 1, 2, 3, vp.NO_VECTOR]
COMMON_FIELDS = [
    (vp.DEVICE_FEATURE_SELECT, 4, [0, 1, 2]), (vp.DRIVER_FEATURE_SELECT, 4, [0, 1, 2]),
    (vp.DRIVER_FEATURE, 4, [0, 1, OFFERED & 0xFFFFFFFF, 0xFFFFFFFF]), (vp.CONFIG_MSIX_VECTOR, 2, VECTORS),
    (vp.DEVICE_STATUS, 1, STATUS_VALUES), (vp.QUEUE_SELECT, 2, [0, 1, 2]),
    (vp.QUEUE_SIZE, 2, [0, 1, 3, 64, 128, 256, 512]), (vp.QUEUE_MSIX_VECTOR, 2, VECTORS),
    (vp.QUEUE_ENABLE, 2, [0, 1, 2]), (vp.QUEUE_DESC, 4, [0x10000]), (vp.QUEUE_DESC + 4, 4, [0, 1]),
    (vp.QUEUE_DRIVER, 8, [0x11000]), (vp.NOTIFY_CFG_OFFSET, 2, [0]), (vp.NOTIFY_CFG_OFFSET + 4, 2, [1]),
    (vp.DEVICE_CFG_OFFSET, 2, [0])]
TABLE_FIELDS = [(vp.MSIX_TABLE_OFFSET + 16 * vector + part, 4, values) for vector in range(4)
                for part, values in ((0, [MSI_ADDRESS]), (8, [0x41]), (12, [0, 1]))]
CONFIG_FIELDS = [
    (vp.COMMAND, 2, [0, 0x0002, 0x0006, 0x0406, 0x0402]), (vp.CAP_MSIX_CONTROL, 2, [0, 0x4000, 0x8000, 0xC000]),
    (vp.PCI_CFG_BAR, 1, [0, 1]), (vp.PCI_CFG_LENGTH, 4, [1, 2, 4, 3]),
    (vp.PCI_CFG_OFFSET, 4, [vp.DEVICE_STATUS, vp.ISR_CFG_OFFSET, vp.NOTIFY_CFG_OFFSET, vp.MSIX_TABLE_OFFSET]),
    (vp.PCI_CFG_DATA, 1, STATUS_VALUES), (vp.PCI_CFG_DATA, 2, [0, 1]), (vp.PCI_CFG_DATA, 4, [0])]
SIZES = st.sampled_from([1, 2, 4, 8, 0, 3])
CONFIG_OFFSETS = st.one_of(st.integers(0, 0xFF), st.integers(-4, 0x1004))
BAR_OFFSETS = st.one_of(st.sampled_from([field[0] for field in COMMON_FIELDS + TABLE_FIELDS]
                                        + [vp.ISR_CFG_OFFSET, vp.MSIX_PBA_OFFSET, vp.BAR_SIZE - 4]),
                        st.integers(-4, vp.BAR_SIZE + 4))
DRIVER_STEP = st.tuples(st.just("driver_step"), st.booleans())
OPERATIONS = st.one_of(
    DRIVER_STEP, DRIVER_STEP, DRIVER_STEP, st.tuples(st.just("driver_finish"), st.booleans()),
    st.tuples(st.just("config_read"), CONFIG_OFFSETS, SIZES),
    st.tuples(st.just("config_write"), CONFIG_OFFSETS, st.builds(encode, VALUES, st.sampled_from([1, 2, 4]))),
    field_writes("config_write", CONFIG_FIELDS),
    st.tuples(st.just("bar_read"), st.sampled_from([0, 0, 0, 1]), BAR_OFFSETS, SIZES),
    st.tuples(st.just("bar_write"), st.sampled_from([0, 0, 0, 2]), BAR_OFFSETS, st.builds(encode, VALUES, SIZES)),
    field_writes("bar_write", COMMON_FIELDS), field_writes("bar_write", COMMON_FIELDS),
    field_writes("bar_write", TABLE_FIELDS), st.tuples(st.just("queue_interrupt"), st.integers(0, 1)),
    st.tuples(st.just("config_interrupt")), st.tuples(st.just("needs_reset")))


def peek(transport):
    """Every queue's size and vector, the config vector and the PBA, read without disturbing anything."""
    guest = Guest(transport)
    command = guest.cfg(vp.COMMAND, 2)
    assert guest.set_cfg(vp.COMMAND, command | vp.COMMAND_MEMORY, 2) == []
    select, queues = guest.read(vp.QUEUE_SELECT, 2), []
    for index in range(len(MAX_SIZES)):
        assert guest.write(vp.QUEUE_SELECT, index, 2) == []
        queues.append((guest.read(vp.QUEUE_SIZE, 2), guest.read(vp.QUEUE_MSIX_VECTOR, 2)))
    assert guest.write(vp.QUEUE_SELECT, select, 2) == []
    view = queues, guest.read(vp.CONFIG_MSIX_VECTOR, 2), guest.read(vp.MSIX_PBA_OFFSET, 8)
    # With nothing changed, this write must fire nothing: no pending vector may be deliverable.
    assert guest.set_cfg(vp.COMMAND, command, 2) == []
    return view


def check_effect(effect, transport, activated):
    """Check one effect of the access just made; returns whether the device is now activated."""
    if isinstance(effect, vp.Activated):
        assert not activated, "a second activation without a reset"
        assert effect.features & ~OFFERED == 0 and effect.features & VERSION_1
        for index, queue in effect.queues.items():
            assert queue.size & (queue.size - 1) == 0 and 0 < queue.size <= MAX_SIZES[index]
        return True
    if isinstance(effect, vp.Reset):
        return False
    if isinstance(effect, (vp.MsiRouteChanged, vp.FirePending)):
        assert 0 <= effect.vector < len(MAX_SIZES) + 1
    elif isinstance(effect, vp.QueueNotified):
        assert 0 <= effect.index < len(MAX_SIZES)
    elif isinstance(effect, vp.InterruptModeChanged):
        assert effect.msix_enabled == transport.msix_enabled
    else:
        assert effect == vp.FireIntx() and transport.intx_asserted
    return activated


@settings(max_examples=150, deadline=None)
@given(st.lists(OPERATIONS, min_size=30, max_size=120))
def test_random_accesses_never_raise_and_keep_invariants(operations):
    transport, _ = new()
    writable = {vp.COMMAND, vp.COMMAND + 1, vp.STATUS, vp.INTERRUPT_LINE, vp.CAP_MSIX_CONTROL + 1,
                vp.PCI_CFG_BAR, *range(vp.PCI_CFG_OFFSET, vp.PCI_CFG_DATA + 4)}
    read_only = int.from_bytes(bytes(0 if offset in writable else 0xFF for offset in range(256)), "little")
    fixed = int.from_bytes(transport.config_read(0, 256), "little") & read_only
    vectors = len(MAX_SIZES) + 1
    activated = False

    def access(kind, *arguments):
        nonlocal activated
        result = getattr(transport, kind)(*arguments)
        if kind.endswith("_read"):
            assert isinstance(result, bytes) and len(result) == arguments[-1]
        elif kind.endswith("_write"):
            for effect in result:
                activated = check_effect(effect, transport, activated)
        elif result is not None:  # a delivery
            assert isinstance(result, vp.MsiVector if transport.msix_enabled else vp.Intx)
            assert getattr(result, "vector", 0) < vectors
        status = transport.status
        assert status & 0x30 == 0
        assert not status & vp.DRIVER_OK or status & vp.FEATURES_OK
        if status & vp.FEATURES_OK:
            assert transport.negotiated_features & ~OFFERED == 0 and transport.negotiated_features & VERSION_1
        assert transport.isr & ~3 == 0
        queues, config_vector, pending = peek(transport)
        for (size, vector), max_size in zip(queues, MAX_SIZES):
            assert size & (size - 1) == 0 and 0 < size <= max_size
            assert vector < vectors or vector == vp.NO_VECTOR
        assert config_vector < vectors or config_vector == vp.NO_VECTOR
        assert pending >> vectors == 0
        assert int.from_bytes(transport.config_read(0, 256), "little") & read_only == fixed

    replayed = {False: 0, True: 0}  # how far each recorded driver has got
    for kind, *arguments in operations:
        if kind in ("driver_step", "driver_finish"):
            writes = DRIVER_WRITES[arguments[0]]
            start = replayed[arguments[0]] % len(writes)
            end = start + 1 if kind == "driver_step" else len(writes)
            replayed[arguments[0]] += end - start
            for write in writes[start:end]:
                access(*write)
        else:
            access(kind, *arguments)
