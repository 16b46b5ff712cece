"""Main's part of virtio-blk: open the images (the jailed child cannot), lock them, and
hand the block children their fds; and `sandvmm create-qcow2`."""

from __future__ import annotations

from pathlib import Path

from sandvmm.errors import UserError
from sandvmm.main.devices import DeviceSpec, host_cpus


# Threads a block child may write with beside its own: one per spare CPU (with two CPUs,
# three helpers made 1 MiB writes slower than one: 574 against 732 MB/s in the lab), up
# to a cap that is not measured (only two CPUs were there to measure on).
MAX_TRANSFER_HELPERS = 3


def disk_name(index: int) -> str:
    """vda, vdb, ..., vdz, vdaa: the names Linux's virtio_blk gives disks in probe order."""
    name = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        name = chr(ord("a") + remainder) + name
    return "vd" + name


def root_parameter(blocks: list[dict]) -> str:
    roots = [index for index, block in enumerate(blocks) if block["root"]]
    if len(roots) > 1:
        raise UserError("more than one --block has root", status=2)
    if not roots:
        return ""
    read_only = blocks[roots[0]]["ro"]
    return f"root=/dev/{disk_name(roots[0])} {'ro' if read_only else 'rw'}"


def block_specs(blocks: list[dict]) -> list[DeviceSpec]:
    """One jailed child per --block, holding only its image chain's fds (opened and locked here)."""
    if not blocks:
        return []
    from sandvmm.devices.block.core import SLICE_BYTES, BlockCore
    from sandvmm.devices.block.disk import ImageError, TransferHelpers
    from sandvmm.devices.block.images import chain_files, open_chain

    # Completions while the rest is copied, and writes on several CPUs, help only where the
    # guest and the copies can run at once.
    spare_cpus = min(host_cpus() - 1, MAX_TRANSFER_HELPERS)
    slice_bytes = SLICE_BYTES if spare_cpus else None
    specs = []
    for index, block in enumerate(blocks):
        try:
            disk, fds = open_chain(block["path"], read_only=block["ro"], direct=block["direct"])
        except ImageError as error:
            raise UserError(f"--block {block['path']}: {error}", status=2) from None
        if spare_cpus:
            helpers = TransferHelpers(spare_cpus)  # one set per child, shared by its chain's files
            for file in chain_files(disk):
                file.helpers = helpers
        core = BlockCore(disk, serial=block["id"], discard=block["sparse"], slice_bytes=slice_bytes)
        specs.append(DeviceSpec(disk_name(index), core, keep_fds=fds, policy="block"))
    return specs


def create_qcow2_command(path: Path, size: int | None, backing_file: str | None) -> None:
    from sandvmm.devices.block.disk import ImageError
    from sandvmm.devices.block.images import open_image
    from sandvmm.devices.block.qcow2 import create_qcow2

    if path.exists() or path.is_symlink():
        raise UserError(f"{path} already exists", hint="remove it first or choose another path", status=2)
    if backing_file is not None and size is None:
        backing = Path(backing_file) if Path(backing_file).is_absolute() else path.parent / backing_file
        try:
            disk = open_image(backing, read_only=True)
        except ImageError as error:
            raise UserError(f"--backing-file {backing_file}: {error}", status=2) from None
        size = disk.size
        disk.close()
    if size is None:
        raise UserError("give the image's SIZE (or a --backing-file to take it from)", status=2)
    try:
        create_qcow2(str(path), size, backing_file=backing_file)
    except (ImageError, OSError) as error:
        raise UserError(f"cannot create {path}: {error}", status=2) from None
