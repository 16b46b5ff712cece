"""--block parsing and the disk names and root= it implies (no KVM, no images needed)."""

from pathlib import Path

import pytest

from sandvmm.cli import build_parser
from sandvmm.errors import UserError
from sandvmm.devices.block.core import SLICE_BYTES
from sandvmm.main.block import block_specs, disk_name, root_parameter
from tests.helpers import one_line_error, sandvmm


def blocks(*options):
    args = build_parser().parse_args(["run", *[item for option in options for item in ("--block", option)]])
    return args.block


def test_crosvm_spelling_with_bare_flags_and_values():
    (block,) = blocks("/images/disk.qcow2,ro,root,sparse=false,id=serial-1,direct=false")
    assert block == {"path": Path("/images/disk.qcow2"), "ro": True, "root": True, "sparse": False,
                     "id": "serial-1", "direct": False}
    (block,) = blocks("path=disk.img,ro=false")
    assert block["path"] == Path("disk.img") and block["ro"] is False and block["sparse"] is True


def test_disk_names_follow_linux():
    assert [disk_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]


def test_root_names_the_disk_and_its_mode():
    assert root_parameter(blocks("a.img", "b.img,root")) == "root=/dev/vdb rw"
    assert root_parameter(blocks("a.img,root,ro")) == "root=/dev/vda ro"
    assert root_parameter(blocks("a.img")) == ""
    with pytest.raises(UserError):
        root_parameter(blocks("a.img,root", "b.img,root"))


@pytest.mark.parametrize("option, says", [
    ("", "path"), ("ro", "path"), ("disk.img,color=blue", "color"), ("disk.img,ro=maybe", "ro=maybe"),
    ("disk.img,id=" + "x" * 21, "20 bytes"),
])
def test_bad_block_options_are_one_line_usage_errors(option, says):
    result = sandvmm("run", "--block", option, "--", "true")
    assert result.returncode == 2
    assert says in one_line_error(result)


def test_a_missing_image_is_refused_before_boot(tmp_path):
    result = sandvmm("run", "--block", str(tmp_path / "missing.img"), "--", "true")
    assert result.returncode == 2
    assert "missing.img" in one_line_error(result)


def test_create_qcow2_makes_an_image_qemu_img_accepts(tmp_path):
    import json
    import subprocess

    base = tmp_path / "base.img"
    base.write_bytes(bytes(3 << 20))
    assert sandvmm("create-qcow2", str(tmp_path / "plain.qcow2"), "1G").returncode == 0
    assert sandvmm("create-qcow2", "--backing-file", "base.img", str(tmp_path / "overlay.qcow2")).returncode == 0
    for name, size, backing in (("plain.qcow2", 1 << 30, None), ("overlay.qcow2", 3 << 20, "base.img")):
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / name)],
                                         capture_output=True, text=True, check=True).stdout)
        assert (info["format"], info["virtual-size"], info.get("backing-filename")) == ("qcow2", size, backing)
        subprocess.run(["qemu-img", "check", str(tmp_path / name)], capture_output=True, check=True)


@pytest.mark.parametrize("args, says", [
    (["{tmp}/exists.qcow2", "1G"], "already exists"),
    (["{tmp}/new.qcow2"], "SIZE"),
    (["{tmp}/new.qcow2", "ten"], "not a size"),
    (["--backing-file", "{tmp}/missing.img", "{tmp}/new.qcow2"], "missing.img"),
])
def test_create_qcow2_errors_are_one_line(tmp_path, args, says):
    (tmp_path / "exists.qcow2").write_bytes(b"")
    result = sandvmm("create-qcow2", *(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2
    assert says in one_line_error(result)


@pytest.mark.parametrize("cpus, slice_bytes, helpers", [(1, None, None), (2, SLICE_BYTES, 1), (8, SLICE_BYTES, 3)])
def test_several_cpus_give_block_children_slices_and_transfer_helpers(tmp_path, monkeypatch, cpus, slice_bytes,
                                                                      helpers):
    from sandvmm.devices.block.images import chain_files
    from sandvmm.devices.block.qcow2 import create_qcow2

    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    create_qcow2(str(tmp_path / "top.qcow2"), 1 << 20, backing_file="base.raw")
    monkeypatch.setattr("sandvmm.main.block.host_cpus", lambda: cpus)
    (spec,) = block_specs(blocks(f"{tmp_path / 'top.qcow2'}"))
    try:
        assert spec.core.slice_bytes == slice_bytes
        files = chain_files(spec.core.disk)
        assert len(files) == 2
        if helpers is None:
            assert all(file.helpers is None for file in files)
        else:  # one set for the whole chain: one child, one copy at a time
            assert files[0].helpers is files[1].helpers and files[0].helpers.threads == helpers
    finally:
        spec.core.disk.close()
