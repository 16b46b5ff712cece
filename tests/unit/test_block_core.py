"""The virtio-blk device core, driven through a fake driver over a fake disk (no KVM, no processes)."""

from __future__ import annotations

import os
import struct

import pytest

from sandvmm.devices.block.core import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    MAX_WRITE_ZEROES_SEGMENTS,
    SLICE_BYTES,
    BlockCore,
)
from sandvmm.devices.block.disk import DiskError
from sandvmm.devices.virtio.device import RING_FEATURES
from sandvmm.devices.virtio.queue import GuestError
from sandvmm.memory import GuestMemory, MiB
from tests.unit.block_rig import (
    DISK_SECTORS, HEADER, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_IN, T_OUT,
    T_SECURE_ERASE, T_WRITE_ZEROES, UNMAP, FileDisk, MemoryDisk, Rig, header_only, segments,
)


@pytest.fixture(scope="module")
def memory():
    return GuestMemory(16 * MiB)  # queues keep views of it alive, so it is never closed


# ---- features and configuration -------------------------------------------------------------

def bits(*numbers: int) -> int:
    return sum(1 << number for number in numbers)


# The spec's numbers (5.2.3), not the module's constants, so that a wrong constant fails here.
SIZE_MAX, SEG_MAX, RO, BLK_SIZE, FLUSH, TOPOLOGY, DISCARD, WRITE_ZEROES = 1, 2, 5, 6, 9, 10, 13, 14


def test_features_offered():
    common = RING_FEATURES | bits(SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY)
    assert BlockCore(MemoryDisk()).features == common | bits(DISCARD, WRITE_ZEROES)
    assert BlockCore(MemoryDisk(), discard=False).features == common | bits(WRITE_ZEROES)
    assert BlockCore(MemoryDisk(read_only=True)).features == common | bits(RO)
    assert BlockCore(MemoryDisk(), read_only=True).features == common | bits(RO)
    assert (BlockCore(MemoryDisk()).name, BlockCore(MemoryDisk()).device_type) == ("block", 2)


def test_a_read_only_disk_cannot_be_made_writable_and_bad_options_fail_early():
    with pytest.raises(ValueError):
        BlockCore(MemoryDisk(read_only=True), read_only=False)
    with pytest.raises(ValueError):
        BlockCore(MemoryDisk(), serial="x" * 21)
    with pytest.raises(ValueError):
        BlockCore(MemoryDisk(), queue_size=100)
    with pytest.raises(ValueError):
        BlockCore(MemoryDisk(), physical_block_size=1000)


# struct virtio_blk_config (5.2.4): (offset, format) of the fields this test reads.
FIELDS = {"capacity": (0, "<Q"), "size_max": (8, "<I"), "seg_max": (12, "<I"), "blk_size": (20, "<I"),
          "writeback": (32, "<B"), "num_queues": (34, "<H"), "write_zeroes_may_unmap": (56, "<B")}


def field(core: BlockCore, name: str) -> int:
    offset, fmt = FIELDS[name]
    return struct.unpack(fmt, core.config_read(offset, struct.calcsize(fmt)))[0]


def test_config_fields_at_their_spec_offsets():
    core = BlockCore(MemoryDisk(size=10 * MiB + 700), queue_size=128)
    assert field(core, "capacity") == (10 * MiB + 700) // 512  # a partial sector is not addressable
    assert field(core, "size_max") == 1 << 20
    assert field(core, "seg_max") == 126
    assert core.config_read(16, 4) == bytes(4)  # geometry (not offered)
    assert field(core, "blk_size") == 512
    assert core.config_read(24, 8) == struct.pack("<BBHI", 3, 0, 8, 0)  # 4 KiB physical, min I/O 4 KiB
    assert field(core, "writeback") == 0
    assert field(core, "num_queues") == 1
    assert core.config_read(36, 12) == struct.pack("<III", MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 8)
    assert core.config_read(48, 9) == struct.pack("<IIB", 1 << 21, MAX_WRITE_ZEROES_SEGMENTS, 1)
    assert core.config_read(60, 12) == bytes(12)  # secure erase (not offered)
    assert field(BlockCore(MemoryDisk(), discard=False), "write_zeroes_may_unmap") == 0


def test_the_pci_transport_takes_the_core_and_shows_its_config():
    from sandvmm.devices.virtio import transport

    pci = transport.VirtioPciTransport(BlockCore(MemoryDisk(), queue_size=256))
    assert struct.unpack_from("<HH", pci.config_read(0, 4)) == (0x1AF4, 0x1042)  # virtio-blk, modern
    pci.config_write(transport.COMMAND, struct.pack("<H", transport.COMMAND_MEMORY))  # decode BAR0
    assert pci.bar_read(0, transport.DEVICE_CFG_OFFSET, 8) == struct.pack("<Q", DISK_SECTORS)
    assert pci.bar_read(0, transport.DEVICE_CFG_OFFSET + 12, 4) == struct.pack("<I", 254)


def test_config_reads_answer_anything_and_writes_change_nothing():
    core = BlockCore(MemoryDisk())
    whole = core.config_read(0, 72)
    assert len(whole) == 72 and whole[:8] == struct.pack("<Q", DISK_SECTORS)
    assert core.config_read(70, 8) == whole[70:] + bytes(6)  # past the end reads zeros
    assert core.config_read(0xFFF, 8) == bytes(8)
    assert core.config_read(-4, 4) == bytes(4)
    assert core.config_read(3, 2) == whole[3:5]  # unaligned pieces of a field
    core.config_write(32, b"\1")  # the writeback byte: CONFIG_WCE is not offered
    core.config_write(0, b"\xff" * 8)
    assert core.config_read(0, 72) == whole


# ---- each request type ----------------------------------------------------------------------

def test_read_hands_guest_buffers_to_the_disk_and_reports_data_plus_status(memory):
    rig = Rig(memory)
    head = rig.submit(T_IN, 3, writable=[1024, 1])
    assert rig.run() == [(head, 1025)]
    written = rig.driver.written_data(head)
    assert written == rig.disk.data[3 * 512:5 * 512] + bytes([S_OK])
    assert rig.disk.calls == [("read", 1536, 1024)]
    assert all(buffer.obj is memory.mapping for buffer in rig.disk.buffers)  # zero copy: views of guest RAM


def test_write_lands_on_the_disk(memory):
    rig = Rig(memory)
    payload = os.urandom(1536)
    assert rig.one(T_OUT, 10, payload) == (S_OK, b"")
    assert rig.disk.data[10 * 512:13 * 512] == payload
    assert all(buffer.obj is memory.mapping for buffer in rig.disk.buffers)
    assert rig.read(10, 3) == payload


def test_flush_reaches_the_disk(memory):
    rig = Rig(memory)
    assert rig.one(T_FLUSH) == (S_OK, b"")
    assert rig.disk.calls == [("flush",)]


@pytest.mark.parametrize("serial, offered, expected", [
    ("disk-7", 20, b"disk-7" + bytes(14)),
    ("exactly-twenty-bytes", 20, b"exactly-twenty-bytes"),  # no NUL when it fills the 20 bytes
    ("disk-7", 64, b"disk-7" + bytes(14)),  # never more than 20
    ("disk-7", 4, b"disk"),  # a short buffer gets what fits
    ("", 20, bytes(20)),
])
def test_get_id(memory, serial, offered, expected):
    rig = Rig(memory, serial=serial)
    assert rig.one(T_GET_ID, writable=[offered, 1]) == (S_OK, expected)


def test_discard_and_write_zeroes_with_several_segments(memory):
    rig = Rig(memory)
    request = segments((0, 8, 0), (32, 16, 0))
    assert rig.one(T_DISCARD, data=request) == (S_OK, b"")
    assert rig.disk.calls == [("discard", 0, 4096), ("discard", 16384, 8192)]
    rig.disk.calls.clear()
    request = segments((5, 2, UNMAP), (60, 4, 0), (9, 0, 0))  # an empty segment is a no-op
    assert rig.one(T_WRITE_ZEROES, data=request) == (S_OK, b"")
    assert rig.disk.calls == [("write_zeroes", 2560, 1024, True), ("write_zeroes", 30720, 2048, False)]
    assert rig.read(5, 2) == bytes(1024) and rig.read(60, 4) == bytes(2048)


def test_write_zeroes_never_unmaps_where_discard_is_off(memory):
    rig = Rig(memory, discard=False)
    assert rig.one(T_WRITE_ZEROES, data=segments((1, 1, UNMAP)))[0] == S_OK
    assert rig.disk.calls == [("write_zeroes", 512, 512, False)]
    assert rig.one(T_DISCARD, data=segments((1, 1, 0)))[0] == S_UNSUPP


@pytest.mark.parametrize("request_type", [T_GET_LIFETIME, T_SECURE_ERASE, 2, 3, 0x0C, 0xFFFFFFFF])
def test_other_request_types_are_unsupported(memory, request_type):
    rig = Rig(memory)
    assert rig.one(request_type, writable=[512, 1]) == (S_UNSUPP, b"")
    assert rig.disk.calls == []


def test_many_requests_complete_in_one_kick(memory):
    rig = Rig(memory, size=256)
    heads = [rig.submit(T_OUT, n, bytes([n]) * 512) for n in range(20)]
    heads += [rig.submit(T_IN, n, writable=[512, 1]) for n in range(20)]
    assert rig.core.process(0) == [0]
    used = rig.driver.used()
    assert [head for head, _ in used] == heads
    for n, head in enumerate(heads[20:]):
        assert rig.driver.written_data(head) == bytes([n]) * 512 + b"\0"
    assert rig.core.process(0) == []  # nothing new


def test_a_call_stops_after_a_slice_of_data(memory):
    # The shell interrupts after each call, so the driver sees finished requests early.
    rig = Rig(memory, MemoryDisk(4 * MiB))
    request = SLICE_BYTES // 2
    writes = [rig.submit(T_OUT, n * request // 512, bytes([n + 1]) * request) for n in range(3)]
    reads = [rig.submit(T_IN, n * request // 512, writable=[request, 1]) for n in range(3)]
    assert rig.core.process(0) == [0]
    assert [head for head, _ in rig.driver.used()] == writes[:2]
    assert rig.core.process(0) == [0]
    assert [head for head, _ in rig.driver.used()] == [writes[2], reads[0]]
    assert rig.core.process(0) == [0] and rig.core.process(0) == []
    assert [head for head, _ in rig.driver.used()] == reads[1:]
    for n, head in enumerate(reads):
        assert rig.driver.written_data(head) == bytes([n + 1]) * request + bytes([S_OK])
    big = rig.submit(T_IN, 0, writable=[2 * SLICE_BYTES, 1])  # larger than a slice: still whole
    small = rig.submit(T_IN, 0, writable=[512, 1])
    assert rig.core.process(0) == [0] and [head for head, _ in rig.driver.used()] == [big]
    assert rig.run() == [(small, 513)]


def test_without_slices_a_call_completes_every_request(memory):
    rig = Rig(memory, MemoryDisk(4 * MiB), slice_bytes=None)
    heads = [rig.submit(T_IN, 0, writable=[SLICE_BYTES, 1]) for _ in range(3)]
    assert rig.core.process(0) == [0] and [head for head, _ in rig.driver.used()] == heads
    assert rig.core.process(0) == []


# ---- buffer layouts ---------------------------------------------------------------------------

def test_header_split_across_descriptors(memory):
    rig = Rig(memory)
    header = HEADER.pack(T_IN, 7)
    head = rig.driver.add_chain(readable=[header[:3], b"", header[3:9], header[9:]], writable=[512, 1])
    assert rig.run() == [(head, 513)]
    assert rig.driver.written_data(head) == rig.disk.data[3584:4096] + b"\0"


def test_header_sharing_a_buffer_with_write_data_and_status_with_read_data(memory):
    rig = Rig(memory)
    payload = os.urandom(1024)
    head = rig.driver.add_chain(readable=[HEADER.pack(T_OUT, 2) + payload[:100], payload[100:]],
                                writable=[1])
    rig.run()
    assert rig.driver.written_data(head) == b"\0" and rig.disk.data[1024:2048] == payload
    head = rig.driver.add_chain(readable=[HEADER.pack(T_IN, 2)], writable=[300, 725, 0])
    assert rig.run() == [(head, 1025)]
    assert rig.driver.written_data(head) == payload + b"\0"


def test_indirect_chains(memory):
    rig = Rig(memory)
    payload = os.urandom(2048)
    pieces = [payload[i:i + 512] for i in range(0, 2048, 512)]
    head = rig.driver.add_chain(readable=[HEADER.pack(T_OUT, 40), *pieces], writable=[1], indirect=True)
    assert rig.run() == [(head, 1)]
    head = rig.driver.add_chain(readable=[HEADER.pack(T_IN, 40)], writable=[512] * 4 + [1], indirect=True)
    assert rig.run() == [(head, 2049)]
    assert rig.driver.written_data(head) == payload + b"\0"


def test_a_chain_of_seg_max_data_buffers(memory):
    rig = Rig(memory, size=64, queue_size=64)
    assert rig.core.seg_max == 62
    head = rig.driver.add_chain(readable=[HEADER.pack(T_IN, 0)], writable=[512] * 62 + [1],
                                indirect=True)
    assert rig.run() == [(head, 62 * 512 + 1)] and len(rig.disk.buffers) == 62


def test_a_real_file_through_preadv_and_pwritev(memory, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 * MiB))
    rig = Rig(memory, FileDisk(path))
    payload = os.urandom(8192)
    assert rig.one(T_OUT, 100, payload, indirect=True)[0] == S_OK
    assert rig.one(T_FLUSH)[0] == S_OK
    assert path.read_bytes()[100 * 512:100 * 512 + 8192] == payload
    status, data = rig.one(T_IN, 2047, writable=[100, 412, 1])
    assert (status, data) == (S_OK, path.read_bytes()[-512:])


# ---- every rule a guest can break: an error status, and the device goes on -----------------------


BAD_REQUESTS = {
    # name: (readable buffers, writable sizes, status, what the device writes before the status)
    "no header": ([], [512, 1], S_IOERR),
    "header too short": ([HEADER.pack(T_IN, 0)[:15]], [512, 1], S_IOERR),
    "short header split": ([b"\0" * 8, b"\0" * 4], [512, 1], S_IOERR),
    "read of a partial sector": (header_only(T_IN), [511, 1], S_IOERR),
    "write of a partial sector": (header_only(T_OUT) + [bytes(513)], [1], S_IOERR),
    "read past the end": (header_only(T_IN, DISK_SECTORS - 1), [1024, 1], S_IOERR),
    "read starting past the end": (header_only(T_IN, DISK_SECTORS + 1), [512, 1], S_IOERR),
    "write past the end": (header_only(T_OUT, DISK_SECTORS) + [bytes(512)], [1], S_IOERR),
    "sector that wraps 2^64": (header_only(T_IN, 2**64 - 1), [1024, 1], S_IOERR),
    "read with readable data": (header_only(T_IN) + [bytes(512)], [512, 1], S_IOERR),
    "write with writable data": (header_only(T_OUT) + [bytes(512)], [512, 1], S_IOERR),
    "get-id with readable data": (header_only(T_GET_ID) + [bytes(20)], [20, 1], S_IOERR),
    "discard of nothing": (header_only(T_DISCARD), [1], S_IOERR),
    "discard of a partial segment": (header_only(T_DISCARD) + [bytes(20)], [1], S_IOERR),
    "discard with writable data": (header_only(T_DISCARD) + [segments((0, 1, 0))], [16, 1],
                                   S_IOERR),
    "too many discard segments": (header_only(T_DISCARD)
                                  + [segments(*[(0, 1, 0)] * (MAX_DISCARD_SEGMENTS + 1))], [1], S_IOERR),
    "discard past the end": (header_only(T_DISCARD) + [segments((0, 1, 0), (60, 5, 0))], [1],
                             S_IOERR),
    "discard of a wrapping range": (header_only(T_DISCARD) + [segments((2**64 - 1, 2, 0))], [1],
                                    S_IOERR),
    "discard bigger than max_discard_sectors": (
        header_only(T_DISCARD) + [segments((0, MAX_DISCARD_SECTORS + 1, 0))], [1], S_IOERR),
    "discard with unmap": (header_only(T_DISCARD) + [segments((0, 1, 0), (2, 1, UNMAP))], [1],
                           S_UNSUPP),
    "write-zeroes with an unknown flag": (header_only(T_WRITE_ZEROES) + [segments((0, 1, 2))], [1],
                                          S_UNSUPP),
    "too many write-zeroes segments": (header_only(T_WRITE_ZEROES)
                                       + [segments(*[(0, 1, 0)] * (MAX_WRITE_ZEROES_SEGMENTS + 1))], [1],
                                       S_IOERR),
}


# Linux's layout behind an indirect table (header, one data buffer, status) is served
# without a Chain (BlockCore._complete_three); the same rules must hold on both paths.
BOTH_PATHS = pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])


def test_one_buffer_requests_in_indirect_tables_take_the_path_without_a_chain(memory):
    rig = Rig(memory)
    chains = []
    complete = rig.core._complete
    rig.core._complete = lambda chain: chains.append(chain) or complete(chain)
    assert rig.one(T_OUT, 3, b"w" * 1024, indirect=True) == (S_OK, b"")
    assert rig.one(T_IN, 3, writable=[1024, 1], indirect=True) == (S_OK, b"w" * 1024)
    assert rig.one(T_IN, DISK_SECTORS, writable=[512, 1], indirect=True)[0] == S_IOERR
    assert chains == []
    assert rig.one(T_GET_ID, writable=[20, 1], indirect=True)[0] == S_OK  # declined: the Chain path
    assert len(chains) == 1


@BOTH_PATHS
@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_an_error_status_and_touches_nothing(memory, name, indirect):
    readable, writable, status = BAD_REQUESTS[name]
    rig = Rig(memory)
    before = bytes(rig.disk.data)
    head = rig.driver.add_chain(readable=readable, writable=writable, indirect=indirect)
    assert rig.run() == [(head, 1)]
    assert rig.driver.written_data(head)[-1] == status
    assert rig.disk.calls == [] and rig.disk.data == before
    assert rig.read(1) == before[512:1024]  # the device goes on


@pytest.mark.parametrize("request_type", [T_DISCARD, T_WRITE_ZEROES])
def test_a_segment_beyond_the_advertised_maximum_is_refused_even_inside_the_disk(memory, request_type):
    disk = MemoryDisk()
    disk.size = 1 << 40  # claims 1 TiB (nothing is stored: the request must not reach it)
    rig = Rig(memory, disk)
    assert rig.one(request_type, data=segments((0, 1, 0), (8, (1 << 21) + 1, 0)))[0] == S_IOERR
    assert disk.calls == []
    assert rig.one(request_type, data=segments((0, 1 << 21, 0)))[0] == S_OK
    assert disk.calls[0][1:3] == (0, 1 << 30)


def test_a_request_with_no_status_byte_is_returned_unexecuted(memory):
    rig = Rig(memory)
    before = bytes(rig.disk.data)
    head = rig.driver.add_chain(readable=header_only(T_OUT, 1) + [bytes(512)])
    empty = rig.driver.add_chain(readable=header_only(T_IN), writable=[0, 0])
    assert rig.run() == [(head, 0), (empty, 0)]
    assert rig.disk.calls == [] and rig.disk.data == before
    assert rig.read(0) == before[:512]


@BOTH_PATHS
def test_a_read_only_device_refuses_every_write(memory, indirect):
    for disk, options in ((MemoryDisk(read_only=True), {}), (MemoryDisk(), {"read_only": True})):
        rig = Rig(memory, disk, **options)
        before = bytes(disk.data)
        everything = rig.core.features | bits(DISCARD, WRITE_ZEROES)
        rig.core.activate(everything, {0: rig.queue})  # even a driver that claims the features
        assert rig.one(T_OUT, 0, bytes(512), indirect=indirect)[0] == S_IOERR
        assert rig.one(T_DISCARD, data=segments((0, 1, 0)))[0] == S_IOERR
        assert rig.one(T_WRITE_ZEROES, data=segments((0, 1, 0)))[0] == S_IOERR
        assert disk.data == before and all(call[0] != "write" for call in disk.calls)
        assert rig.read(2) == before[1024:1536]
        assert rig.one(T_FLUSH)[0] == S_OK


def test_features_the_driver_did_not_take_are_unsupported(memory):
    rig = Rig(memory, features=RING_FEATURES)
    assert rig.one(T_DISCARD, data=segments((0, 1, 0)))[0] == S_UNSUPP
    assert rig.one(T_WRITE_ZEROES, data=segments((0, 1, 0)))[0] == S_UNSUPP
    assert rig.disk.calls == []


@pytest.mark.parametrize("failure", [DiskError("bad cluster"), OSError(5, "EIO")])
@pytest.mark.parametrize("request_type, data, writable", [
    (T_IN, b"", [512, 1]), (T_OUT, bytes(512), [1]), (T_FLUSH, b"", [1]),
    (T_DISCARD, segments((0, 1, 0)), [1]), (T_WRITE_ZEROES, segments((0, 1, 0)), [1]),
])
@BOTH_PATHS
def test_a_disk_error_is_an_io_error_for_the_guest(memory, failure, request_type, data, writable, indirect):
    rig = Rig(memory)
    rig.disk.failure = failure
    head = rig.submit(request_type, 0, data, writable=writable, indirect=indirect)
    assert rig.run() == [(head, 1)]
    assert rig.driver.written_data(head)[-1] == S_IOERR
    rig.disk.failure = None
    assert rig.one(T_FLUSH)[0] == S_OK


def test_a_malformed_chain_is_returned_empty_and_the_next_one_served(memory):
    rig = Rig(memory)
    (bad,) = rig.driver.reserve(1)
    rig.driver.write_descriptor(bad, 0xFFFF_FFFF_0000, 16, 0)  # not guest RAM
    rig.driver.offer(bad)
    good = rig.submit(T_IN, 0, writable=[512, 1])
    assert rig.run() == [(bad, 0), (good, 513)]


def test_a_broken_ring_goes_to_the_shell(memory):
    rig = Rig(memory)
    rig.driver.set_available_idx(1000)
    with pytest.raises(GuestError) as raised:
        rig.core.process(0)
    assert raised.value.head is None


def test_nothing_happens_on_other_queues_before_activation_or_after_reset(memory):
    rig = Rig(memory)
    rig.core.reset()
    rig.submit(T_FLUSH)
    assert rig.core.process(0) == [] and rig.core.process(1) == []
    assert rig.driver.used() == [] and rig.disk.calls == []
    rig.core.activate(rig.core.features, {0: rig.queue})
    assert rig.core.process(1) == []
    assert rig.core.process(0) == [0] and len(rig.driver.used()) == 1
