"""`sandvmm image`: images from Debian packages, cached and reused offline, with clear errors."""

import subprocess
import time


from sandvmm.image.build import ensure_image
from sandvmm.main.boot import BzImage
from tests.helpers import one_line_error, sandvmm

UNREACHABLE_MIRROR = {"SANDVMM_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}


def archive_names(path) -> set[str]:
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(path, "rb"), capture_output=True, text=True, check=True)
    return set(listing.stdout.splitlines())


def test_a_second_build_downloads_nothing_and_is_fast():
    ensure_image()
    started = time.monotonic()
    # With the registry pointed at a closed port, any download would fail the build.
    result = sandvmm("image", "build", env=UNREACHABLE_MIRROR)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result
    assert elapsed < 2, f"a cached build took {elapsed:.2f} s"
    assert result.stdout.strip() == str(ensure_image().directory)


def test_image_path_names_the_built_files():
    image = ensure_image()
    for name, expected in (("kernel", image.kernel), ("vmlinux", image.vmlinux), ("initrd", image.initrd),
                           ("lab-initrd", image.lab_initrd)):
        result = sandvmm("image", "path", name)
        assert result.returncode == 0 and result.stdout.strip() == str(expected)
        assert expected.stat().st_size > 1_000_000


def test_the_image_vmlinux_is_the_bzimage_payload_decompressed():
    image = ensure_image()
    bzimage = BzImage.parse(image.kernel.read_bytes())
    declared = int.from_bytes(bytes(bzimage.payload[-4:]), "little")  # Kbuild's size trailer (zstd)
    assert image.vmlinux.stat().st_size == declared
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"


def test_default_initramfs_has_init_busybox_and_every_module_it_loads():
    image = ensure_image()
    names = archive_names(image.initrd)
    assert {"init", "bin/busybox", "etc/sandvmm-modules", "dev/console"} <= names
    assert image.manifest["kernel"].startswith("linux-image-6.12.")
    for module in image.manifest["guest_modules"]:
        assert f"lib/modules/{module}.ko" in names
    lab_names = archive_names(image.lab_initrd)
    for module in ("kvm", "kvm_amd", "9p", "9pnet_virtio", "overlay"):
        assert f"lib/modules/{module}.ko" in lab_names


def test_with_adds_packages_and_their_shared_libraries():
    image = ensure_image(["hello"])
    names = archive_names(image.initrd)
    assert "usr/bin/hello" in names
    assert any(name.endswith("libc.so.6") for name in names)
    assert "lib64/ld-linux-x86-64.so.2" in names
    packages = {spec.split("=")[0] for spec in image.manifest["packages"]}
    assert {"hello", "libc6"} <= packages
    assert not any(name.startswith("usr/share/doc/") for name in names)


def test_unknown_package_is_a_one_line_error():
    error = one_line_error(sandvmm("image", "build", "--with", "hello,no-such-package-sandvmm"))
    assert "no-such-package-sandvmm" in error


def test_a_malformed_package_name_is_a_usage_error():
    result = sandvmm("image", "build", "--with", "Not A Name")
    assert result.returncode == 2
    assert "not a Debian package name" in one_line_error(result)


def test_no_registry_reachable_is_a_one_line_error(tmp_path):
    result = sandvmm("image", "build", env={**UNREACHABLE_MIRROR, "XDG_CACHE_HOME": str(tmp_path)})
    assert "cannot reach the Debian package registry" in one_line_error(result)


def test_image_path_before_any_build_says_what_to_run(tmp_path):
    error = one_line_error(sandvmm("image", "path", "kernel", env={"XDG_CACHE_HOME": str(tmp_path)}))
    assert "sandvmm image build" in error
