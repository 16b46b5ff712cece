"""The virtio-pci modern transport (virtio 1.2, section 4.1) of one device, as pure state.

A device child owns its PCI function except the BAR registers: main forwards every other
configuration-space access, and every access to BAR0, to the child, which answers through
this class. There are no syscalls here. Accesses go in; bytes and *effects* come out, and
the child's thin I/O shell acts on the effects (start or stop queue work, have main re-route
an MSI, signal an irqfd). The guest controls every access, so none of them raises: odd
sizes, offsets and values read as zeros or are ignored.

BAR0 (64 KiB, 64-bit memory, not prefetchable), one 4 KiB page per structure:

    0x0000  common configuration (section 4.1.4.3)
    0x1000  ISR status
    0x2000  device-specific configuration (the device model's)
    0x3000  notifications: queue n at 0x3000 + 4 * n
    0x4000  MSI-X table: one vector per queue plus one, mapped to events by the driver
    0x5000  MSI-X pending-bit array
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sandvmm.devices.virtio.msix import ENTRY_SIZE, MsixTable, padded_slice
from sandvmm.devices.virtio.queue import QueueConfig

# --- BAR0 layout --------------------------------------------------------------------------
BAR_INDEX = 0
BAR_SIZE = 0x10000
BAR_IS_64BIT = True
BAR_PREFETCHABLE = False
REGION_SIZE = 0x1000
COMMON_CFG_OFFSET = 0x0000
ISR_CFG_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_CFG_OFFSET = 0x3000
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
NOTIFY_OFF_MULTIPLIER = 4  # a distinct notify address per queue, so each gets its own ioeventfd
MAX_QUEUES = REGION_SIZE // ENTRY_SIZE - 1  # the table (queues + config vector) fits its page
MAX_BAR_ACCESS = 8

# --- configuration space ------------------------------------------------------------------
CONFIG_SPACE_SIZE = 0x1000  # PCIe-sized for ECAM; 0x100 and above read as zero
HEADER_SIZE = 0x100
VIRTIO_VENDOR_ID = 0x1AF4
VIRTIO_DEVICE_ID_BASE = 0x1040
REVISION = 1  # non-transitional devices SHOULD have revision >= 1 (4.1.2.1)
DEFAULT_SUBSYSTEM_ID = 0x40  # ... and subsystem id >= 0x40, so legacy drivers leave them alone
COMMAND = 0x04
COMMAND_IO, COMMAND_MEMORY, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE = 1, 2, 4, 1 << 10
STATUS = 0x06
STATUS_INTERRUPT, STATUS_CAPABILITIES = 1 << 3, 1 << 4
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
PCI_CAP_ID_MSIX, PCI_CAP_ID_VENDOR = 0x11, 0x09
MSIX_ENABLE, MSIX_FUNCTION_MASK = 1 << 15, 1 << 14
# Capability chain: MSI-X, then the virtio structures (virtio_pci_cap, section 4.1.4).
CAP_MSIX, CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 0x40, 0x4C, 0x5C, 0x70, 0x80, 0x90
CAP_MSIX_CONTROL = CAP_MSIX + 2
PCI_CFG_BAR, PCI_CFG_OFFSET, PCI_CFG_LENGTH, PCI_CFG_DATA = (CAP_PCI_CFG + n for n in (4, 8, 12, 16))
VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG = 1, 2, 3
VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_PCI_CFG = 4, 5
# PCI class codes (class, subclass, prog-if) by virtio device id, as QEMU and crosvm present them.
CLASS_OTHER = 0xFF0000  # "device does not fit any defined class"
CLASS_CODES = {1: 0x020000, 2: 0x010000, 3: 0x078000, 8: 0x010000, 9: 0x018000, 16: 0x038000,
               18: 0x098000, 19: 0x078000, 25: 0x040100, 26: 0x018000}

# --- common configuration (struct virtio_pci_common_cfg) ----------------------------------
_COMMON_LAYOUT = struct.Struct("<IIIIHHBBHHHHHQQQHH")
COMMON_CFG_LENGTH = _COMMON_LAYOUT.size  # 0x3C, through queue_reset
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30
NO_VECTOR = 0xFFFF
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, DEVICE_NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
DRIVER_STATUS_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED
ISR_QUEUE, ISR_CONFIG = 1, 2
MAX_QUEUE_SIZE = 0x8000

# --- feature bits ---------------------------------------------------------------------------
VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1 = 28, 29, 32
# Transport features that need machinery this transport lacks: a device may not offer them.
UNSUPPORTED_FEATURES = {
    34: "VIRTIO_F_RING_PACKED (queue_size rules differ; queues are split only)",
    37: "VIRTIO_F_SR_IOV", 38: "VIRTIO_F_NOTIFICATION_DATA", 39: "VIRTIO_F_NOTIF_CONFIG_DATA",
    40: "VIRTIO_F_RING_RESET", 41: "VIRTIO_F_ADMIN_VQ",
}


class VirtioDeviceModel(Protocol):
    """What each device core (rng, console, block...) tells the transport."""

    device_type: int  # virtio device id: 1 net, 2 block, 3 console, 4 entropy...
    queue_max_sizes: Sequence[int]  # one entry per queue, each a power of two
    features: int  # device bits, plus transport bits it supports (INDIRECT_DESC, RING_EVENT_IDX)

    def config_read(self, offset: int, size: int) -> bytes:
        """Device-specific configuration. Must answer any offset below 0x1000, sizes 1 to 8."""

    def config_write(self, offset: int, data: bytes) -> None: ...


# --- effects: returned by config_write / bar_write, for the shell to act on ----------------
@dataclass(frozen=True)
class Activated:
    """The driver set DRIVER_OK after FEATURES_OK: start the queues (enabled ones only)."""
    features: int
    queues: dict[int, QueueConfig]  # queue index -> its rings


@dataclass(frozen=True)
class Reset:
    """The driver wrote 0 to device_status: stop all queue work."""


@dataclass(frozen=True)
class MsiRouteChanged:
    """A table entry's address/data changed: main re-routes that vector's GSI."""
    vector: int
    address: int
    data: int


@dataclass(frozen=True)
class InterruptModeChanged:
    """MSI-X Enable toggled; INTx is used while it is off."""
    msix_enabled: bool


@dataclass(frozen=True)
class FirePending:
    """A vector with its pending bit set became deliverable: signal its irqfd now."""
    vector: int


@dataclass(frozen=True)
class FireIntx:
    """A config-space write let a pending ISR through to INTx: assert the INTx irqfd now."""


@dataclass(frozen=True)
class QueueNotified:
    """A write hit queue `index`'s notify address (seen only where no ioeventfd catches it)."""
    index: int


Effect = (Activated | Reset | MsiRouteChanged | InterruptModeChanged | FirePending | FireIntx
          | QueueNotified)


# --- deliveries: what queue_interrupt / config_interrupt / needs_reset ask of the shell ----
@dataclass(frozen=True)
class MsiVector:
    """Signal vector n's irqfd."""
    vector: int


@dataclass(frozen=True)
class Intx:
    """Assert the INTx irqfd (the ISR bit is already set)."""


Delivery = MsiVector | Intx | None


class _Queue:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size = max_size
        self.vector = NO_VECTOR
        self.enabled = False
        self.addresses = [0, 0, 0]  # descriptor table, driver area, device area


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _feature_window(features: int, select: int) -> int:
    """Feature bits 32*select to 32*select+31; windows past bit 63 are empty."""
    return features >> 32 * select & 0xFFFFFFFF if select < 2 else 0


def _check_device(device_type: int, queue_max_sizes: tuple[int, ...], features: int) -> None:
    """A device model's programming errors fail at construction, never at guest time."""
    if not 1 <= device_type <= 0x3F:
        raise ValueError(f"virtio device type {device_type} is outside PCI device ids 0x1041-0x107f")
    if len(queue_max_sizes) > MAX_QUEUES:
        raise ValueError(f"{len(queue_max_sizes)} queues; the BAR layout holds at most {MAX_QUEUES}")
    for size in queue_max_sizes:
        if not (_is_power_of_two(size) and size <= MAX_QUEUE_SIZE):
            raise ValueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
    if not 0 <= features < 1 << 64:
        raise ValueError("feature bits must fit in 64 bits")
    for bit, name in UNSUPPORTED_FEATURES.items():
        if features >> bit & 1:
            raise ValueError(f"the virtio-pci transport does not implement {name}")


def _virtio_cap(cfg: bytearray, at: int, next_cap: int, cfg_type: int, offset: int, length: int,
                extra: bytes = b"") -> None:
    struct.pack_into("<BBBBBBHII", cfg, at, PCI_CAP_ID_VENDOR, next_cap, 16 + len(extra),
                     cfg_type, BAR_INDEX, 0, 0, offset, length)
    cfg[at + 16:at + 16 + len(extra)] = extra


class VirtioPciTransport:
    BAR_INDEX = BAR_INDEX
    BAR_SIZE = BAR_SIZE

    def __init__(self, device: VirtioDeviceModel, *, subsystem_id: int = DEFAULT_SUBSYSTEM_ID,
                 class_code: int | None = None):
        queue_max_sizes = tuple(device.queue_max_sizes)
        _check_device(device.device_type, queue_max_sizes, device.features)
        self.device = device
        self.offered_features = device.features | 1 << VIRTIO_F_VERSION_1
        self._queue_max_sizes = queue_max_sizes
        self._msix = MsixTable(len(queue_max_sizes) + 1)
        notify_length = NOTIFY_OFF_MULTIPLIER * max(len(queue_max_sizes), 1)
        # The BAR ranges the pci_cfg window may reach: the other virtio structures (4.1.4.9).
        self._virtio_structures = ((COMMON_CFG_OFFSET, COMMON_CFG_LENGTH), (ISR_CFG_OFFSET, 1),
                                   (DEVICE_CFG_OFFSET, REGION_SIZE), (NOTIFY_CFG_OFFSET, notify_length))
        if class_code is None:
            class_code = CLASS_CODES.get(device.device_type, CLASS_OTHER)
        self._config = self._build_header(device.device_type, class_code, subsystem_id, notify_length)
        self._writable = bytearray(HEADER_SIZE)
        struct.pack_into("<H", self._writable, COMMAND,
                         COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE)
        self._writable[INTERRUPT_LINE] = 0xFF
        self._writable[CAP_MSIX_CONTROL + 1] = (MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8
        self._writable[PCI_CFG_BAR] = 0xFF
        self._writable[PCI_CFG_OFFSET:PCI_CFG_DATA + 4] = b"\xff" * 12
        self._config_generation = 0
        self._config_changed_unread = False
        self._reset()

    def _build_header(self, device_type: int, class_code: int, subsystem_id: int,
                      notify_length: int) -> bytearray:
        cfg = bytearray(HEADER_SIZE)
        struct.pack_into("<HHHH", cfg, 0x00, VIRTIO_VENDOR_ID, VIRTIO_DEVICE_ID_BASE + device_type,
                         0, STATUS_CAPABILITIES)
        struct.pack_into("<I", cfg, 0x08, (class_code & 0xFFFFFF) << 8 | REVISION)
        struct.pack_into("<HH", cfg, 0x2C, VIRTIO_VENDOR_ID, subsystem_id & 0xFFFF)
        cfg[CAPABILITIES_POINTER] = CAP_MSIX
        cfg[INTERRUPT_PIN] = 1  # INTA#
        struct.pack_into("<BBHII", cfg, CAP_MSIX, PCI_CAP_ID_MSIX, CAP_COMMON,
                         self._msix.vector_count - 1, MSIX_TABLE_OFFSET | BAR_INDEX,
                         MSIX_PBA_OFFSET | BAR_INDEX)
        _virtio_cap(cfg, CAP_COMMON, CAP_NOTIFY, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET,
                    COMMON_CFG_LENGTH)
        _virtio_cap(cfg, CAP_NOTIFY, CAP_ISR, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_CFG_OFFSET,
                    notify_length, struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        _virtio_cap(cfg, CAP_ISR, CAP_DEVICE, VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1)
        _virtio_cap(cfg, CAP_DEVICE, CAP_PCI_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET,
                    REGION_SIZE)
        # bar/offset/length start at zero: the driver sets them before using the window.
        _virtio_cap(cfg, CAP_PCI_CFG, 0, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4))
        return cfg

    def _reset(self) -> None:
        """Device reset (device_status = 0). PCI state - command, MSI-X table - is untouched."""
        self._status = 0
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._config_vector = NO_VECTOR
        self._queue_select = 0
        self._queues = [_Queue(size) for size in self._queue_max_sizes]
        self._isr = 0
        # Interrupts of the old incarnation are moot; firing them on a later unmask would
        # only hand the new driver spurious ones.
        self._msix.pending = 0
        # config_generation is not reset: a driver comparing values across the reset
        # must still see a change if the configuration changed.

    # --- state the shell and tests read ---------------------------------------------------
    @property
    def status(self) -> int:
        return self._status

    @property
    def isr(self) -> int:
        return self._isr

    @property
    def config_generation(self) -> int:
        return self._config_generation

    @property
    def negotiated_features(self) -> int | None:
        """The driver's features once FEATURES_OK stuck, else None."""
        return self._driver_features if self._status & FEATURES_OK else None

    @property
    def num_queues(self) -> int:
        return len(self._queues)

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self._config, COMMAND)[0]

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_control & MSIX_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self._msix_control & MSIX_FUNCTION_MASK)

    @property
    def _msix_control(self) -> int:
        return struct.unpack_from("<H", self._config, CAP_MSIX_CONTROL)[0]

    @property
    def intx_asserted(self) -> bool:
        """The INTx line's level; the shell re-asserts on a resample event while it is true."""
        return not self.msix_enabled and self._isr != 0 and not self.command & COMMAND_INTX_DISABLE

    def notify_offset(self, queue_index: int) -> int:
        """The BAR offset of a queue's notify address (main registers an ioeventfd there)."""
        if not 0 <= queue_index < len(self._queues):
            raise ValueError(f"no queue {queue_index}")
        return NOTIFY_CFG_OFFSET + queue_index * NOTIFY_OFF_MULTIPLIER

    # --- interrupts raised by the device ----------------------------------------------------
    def queue_interrupt(self, queue_index: int) -> Delivery:
        """The device put buffers in queue `queue_index`'s used ring and wants to notify."""
        if not 0 <= queue_index < len(self._queues):
            raise ValueError(f"no queue {queue_index}")
        queue = self._queues[queue_index]
        if not (self._status & DRIVER_OK and queue.enabled):
            return None  # no used-buffer notifications before DRIVER_OK (2.1.2), nor after a reset
        if not self.msix_enabled:
            self._isr |= ISR_QUEUE
        return self._deliver(queue.vector)

    def config_interrupt(self) -> Delivery:
        """The device-specific configuration changed."""
        self._config_changed_unread = True
        return self._notify_config()

    def needs_reset(self) -> Delivery:
        """The device hit an error only a reset cures: set DEVICE_NEEDS_RESET and tell the driver."""
        if self._status & DEVICE_NEEDS_RESET:
            return None
        self._status |= DEVICE_NEEDS_RESET
        return self._notify_config()

    def _notify_config(self) -> Delivery:
        if not self._status & DRIVER_OK:
            return None  # the driver reads the configuration itself while it sets up
        self._isr |= ISR_CONFIG  # set even under MSI-X (4.1.4.5.1)
        return self._deliver(self._config_vector)

    def _deliver(self, vector: int) -> Delivery:
        if not self.msix_enabled:
            return Intx() if self.intx_asserted else None
        if vector == NO_VECTOR or not self.command & COMMAND_BUS_MASTER:
            return None  # unmapped; or the function may not write memory, and an MSI is a write
        if self.msix_function_masked or self._msix.masked(vector):
            self._msix.set_pending(vector)
            return None
        return MsiVector(vector)

    def _fire_deliverable_pending(self) -> list[Effect]:
        if not self.msix_enabled or self.msix_function_masked or not self.command & COMMAND_BUS_MASTER:
            return []
        return [FirePending(vector) for vector in self._msix.take_unmasked_pending()]

    # --- configuration space ------------------------------------------------------------------
    def header(self) -> bytes:
        """The 256-byte header as written so far: main's mirror, right outside volatile_registers()."""
        return bytes(self._config)

    def volatile_registers(self) -> list[tuple[int, int]]:
        """The (register, length) whose value may change before the next write reaches us.

        Main mirrors the rest of the header and answers reads itself, so the guest's PCI
        scan never waits on this process. A pci_cfg data read fetches from the BAR. STATUS
        carries the ISR's OR under INTx, which can turn on only once the driver is OK (no
        interrupt comes before DRIVER_OK); until then, and under MSI-X, it is static.
        """
        volatile = [(PCI_CFG_DATA, 4)]
        if not self.msix_enabled and (self._status & DRIVER_OK or self._isr):
            volatile.append((STATUS, 2))
        return volatile

    def config_read(self, offset: int, size: int) -> bytes:
        if not 0 <= size <= CONFIG_SPACE_SIZE:
            return b""
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return bytes(size)
        if offset < PCI_CFG_DATA + 4 and PCI_CFG_DATA < offset + size:
            self._window_read()
        header = bytearray(self._config)
        if not self.msix_enabled and self._isr:
            header[STATUS] |= STATUS_INTERRUPT  # the OR of the ISR bits while INTx is in use (4.1.4.5.1)
        return padded_slice(header, offset, size)

    def config_write(self, offset: int, data: bytes) -> list[Effect]:
        if offset < 0 or offset + len(data) > CONFIG_SPACE_SIZE:
            return []
        msix_was_enabled, intx_was_asserted = self.msix_enabled, self.intx_asserted
        for index, byte in enumerate(data[:max(HEADER_SIZE - offset, 0)]):
            mask = self._writable[offset + index]
            self._config[offset + index] = (self._config[offset + index] & ~mask) | (byte & mask)
        effects: list[Effect] = []
        if offset < PCI_CFG_DATA + 4 and PCI_CFG_DATA < offset + len(data):
            effects += self._window_write()
        if self.msix_enabled != msix_was_enabled:
            effects.append(InterruptModeChanged(self.msix_enabled))
        effects += self._fire_deliverable_pending()
        if self.intx_asserted and not intx_was_asserted:
            effects.append(FireIntx())
        return effects

    def _window(self) -> tuple[int, int] | None:
        """The (offset, length) the pci_cfg capability points at, if the driver set a valid one."""
        bar = self._config[PCI_CFG_BAR]
        offset, length = struct.unpack_from("<II", self._config, PCI_CFG_OFFSET)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length:
            return None
        if any(start <= offset and offset + length <= start + size
               for start, size in self._virtio_structures):
            return offset, length
        return None

    def _window_read(self) -> None:
        window = self._window()
        if window is not None:
            offset, length = window
            self._config[PCI_CFG_DATA:PCI_CFG_DATA + length] = self._bar_read(offset, length)

    def _window_write(self) -> list[Effect]:
        window = self._window()
        if window is None:
            return []
        offset, length = window
        return self._bar_write(offset, bytes(self._config[PCI_CFG_DATA:PCI_CFG_DATA + length]))

    # --- BAR0 ---------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if not 0 <= size <= MAX_BAR_ACCESS:
            return b""
        if not self.command & COMMAND_MEMORY:
            return b"\xff" * size  # not decoding: as an unclaimed address reads
        if bar != BAR_INDEX:
            return bytes(size)
        return self._bar_read(offset, size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> list[Effect]:
        if bar != BAR_INDEX or not self.command & COMMAND_MEMORY or not 0 < len(data) <= MAX_BAR_ACCESS:
            return []
        return self._bar_write(offset, data)

    def _bar_read(self, offset: int, size: int) -> bytes:
        region, within = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if size not in (1, 2, 4, 8) or not 0 <= offset < BAR_SIZE or within + size > REGION_SIZE:
            return bytes(size)
        if region == COMMON_CFG_OFFSET:
            return padded_slice(self._common_image(), within, size)
        if region == ISR_CFG_OFFSET:
            if within != 0:
                return bytes(size)
            value, self._isr = self._isr, 0  # reading ISR acknowledges it (4.1.4.5)
            return bytes([value]).ljust(size, b"\0")
        if region == DEVICE_CFG_OFFSET:
            if self._config_changed_unread:  # the spec's wrap-proof scheme (4.1.4.3.1)
                self._config_generation = (self._config_generation + 1) & 0xFF
                self._config_changed_unread = False
            return bytes(self.device.config_read(within, size))[:size].ljust(size, b"\0")
        if region == MSIX_TABLE_OFFSET:
            return self._msix.read_table(within, size)
        if region == MSIX_PBA_OFFSET:
            return self._msix.read_pba(within, size)
        return bytes(size)  # notify addresses and the unused rest read as zero

    def _bar_write(self, offset: int, data: bytes) -> list[Effect]:
        region, within = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if len(data) not in (1, 2, 4, 8) or not 0 <= offset < BAR_SIZE or within + len(data) > REGION_SIZE:
            return []
        if region == COMMON_CFG_OFFSET:
            return self._common_write(within, data)
        if region == DEVICE_CFG_OFFSET:
            self.device.config_write(within, bytes(data))
        elif region == NOTIFY_CFG_OFFSET:
            index, remainder = divmod(within, NOTIFY_OFF_MULTIPLIER)
            if remainder == 0 and index < len(self._queues):
                return [QueueNotified(index)]
        elif region == MSIX_TABLE_OFFSET:
            effects: list[Effect] = [MsiRouteChanged(vector, *self._msix.message(vector))
                                     for vector in self._msix.write_table(within, data)]
            return effects + self._fire_deliverable_pending()
        return []

    # --- common configuration ------------------------------------------------------------------
    def _selected(self) -> _Queue | None:
        return self._queues[self._queue_select] if self._queue_select < len(self._queues) else None

    def _common_image(self) -> bytes:
        queue = self._selected()
        if queue is None:  # no such queue: size 0 says "unavailable" (4.1.4.3.1)
            size, vector, enabled, notify_off, addresses = 0, NO_VECTOR, 0, 0, (0, 0, 0)
        else:
            size, vector, enabled = queue.size, queue.vector, int(queue.enabled)
            notify_off, addresses = self._queue_select, queue.addresses
        return _COMMON_LAYOUT.pack(
            self._device_feature_select, _feature_window(self.offered_features, self._device_feature_select),
            self._driver_feature_select, _feature_window(self._driver_features, self._driver_feature_select),
            self._config_vector, len(self._queues), self._status, self._config_generation,
            self._queue_select, size, vector, enabled, notify_off, *addresses,
            0, 0)  # queue_notify_data, queue_reset: their features are never offered

    def _valid_vector(self, vector: int) -> int:
        """A vector the table has, or NO_VECTOR: how the spec reports a failed mapping."""
        return vector if vector < self._msix.vector_count else NO_VECTOR

    def _common_write(self, offset: int, data: bytes) -> list[Effect]:
        # The driver uses each field's own width (4.1.3.1), 64-bit fields also as two
        # 32-bit halves; any other access is ignored rather than half-applied.
        value = int.from_bytes(data, "little")
        width = len(data)
        if (offset, width) == (DEVICE_FEATURE_SELECT, 4):
            self._device_feature_select = value
        elif (offset, width) == (DRIVER_FEATURE_SELECT, 4):
            self._driver_feature_select = value
        elif (offset, width) == (DRIVER_FEATURE, 4):
            # Features are fixed once FEATURES_OK is set; windows above 63 hold no offered bit.
            if not self._status & FEATURES_OK and self._driver_feature_select < 2:
                shift = 32 * self._driver_feature_select
                self._driver_features = self._driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif (offset, width) == (CONFIG_MSIX_VECTOR, 2):
            self._config_vector = self._valid_vector(value)
        elif (offset, width) == (DEVICE_STATUS, 1):
            return self._write_status(value)
        elif (offset, width) == (QUEUE_SELECT, 2):
            self._queue_select = value
        elif (queue := self._selected()) is not None:
            self._queue_write(queue, offset, width, value)
        return []

    def _queue_write(self, queue: _Queue, offset: int, width: int, value: int) -> None:
        if (offset, width) == (QUEUE_MSIX_VECTOR, 2):
            queue.vector = self._valid_vector(value)  # remappable at any time, as the spec allows
            return
        if queue.enabled or self._status & DRIVER_OK:
            return  # a live queue's size and rings are fixed until reset
        if (offset, width) == (QUEUE_SIZE, 2):
            if _is_power_of_two(value) and value <= queue.max_size:
                queue.size = value
        elif (offset, width) == (QUEUE_ENABLE, 2):
            queue.enabled = value == 1  # the driver may only write 1 (4.1.4.3.2)
        elif QUEUE_DESC <= offset < QUEUE_DEVICE + 8:
            which, part = divmod(offset - QUEUE_DESC, 8)
            if (part, width) == (0, 8):
                queue.addresses[which] = value
            elif part in (0, 4) and width == 4:
                shift = 8 * part
                queue.addresses[which] = queue.addresses[which] & ~(0xFFFFFFFF << shift) | value << shift

    def _write_status(self, value: int) -> list[Effect]:
        if value == 0:
            self._reset()
            return [Reset()]
        # Bits only accumulate (the driver MUST NOT clear one); DEVICE_NEEDS_RESET is the device's.
        new = value & DRIVER_STATUS_BITS & ~self._status
        if (self._status | new) & FAILED:
            new &= ~(FEATURES_OK | DRIVER_OK)  # the driver gave up: it must reset first (2.1.1)
        if new & FEATURES_OK and not self._features_acceptable():
            new &= ~FEATURES_OK  # refusal is FEATURES_OK not sticking (2.2.2)
        if new & DRIVER_OK and not (self._status | new) & FEATURES_OK:
            new &= ~DRIVER_OK  # no negotiated features, nothing to run
        self._status |= new
        if new & DRIVER_OK:
            queues = {index: QueueConfig(queue.size, *queue.addresses)
                      for index, queue in enumerate(self._queues) if queue.enabled}
            return [Activated(self._driver_features, queues)]
        return []

    def _features_acceptable(self) -> bool:
        features = self._driver_features
        return features & ~self.offered_features == 0 and bool(features >> VIRTIO_F_VERSION_1 & 1)
