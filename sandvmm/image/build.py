"""Guest images built from Debian packages only.

An image is a directory in the cache holding:
  vmlinuz          the bookworm-backports 6.12 kernel, unchanged
  vmlinux          the same kernel decompressed (an ELF file), which sandvmm boots by default:
                   otherwise every boot decompresses it inside the guest, about 0.7 s under the lab
  initrd.img       the default guest: busybox, our init, virtio modules, `--with` packages
  lab-initrd.img   the lab's stage-one initramfs: busybox, KVM and 9p modules, the lab init
  manifest.json    every package and version that went in

Its directory name is a hash of the package versions, so a new kernel or package release
gives a new image while an unchanged one is reused. `index.json` maps a request (the
`--with` list) to its image, which is what lets a repeated build finish offline.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from sandvmm.errors import UserError
from sandvmm.image.store import Image, builder_version, cache_dir, find_image, index_path, read_index, request_key
from sandvmm.image.apt import Package, PrivateApt, progress
from sandvmm.image.cpio import CpioWriter


GUEST_MODULES = (
    "virtio_blk", "virtio_net", "virtio_rng", "virtio_input", "virtio_balloon",
    "vmw_vsock_virtio_transport", "virtio_gpu", "virtio_snd", "ext4", "9pnet_virtio", "9p",
    "pvpanic_mmio",  # tells the VMM about a kernel panic (ACPI device QEMU0001)
    "crc32c_generic",  # ext4 asks the crypto API for crc32c at mount time, not through a module dependency
)
LAB_MODULES = ("kvm_amd", "9pnet_virtio", "9p", "overlay", "tun", "ext4")
# Documentation is of no use in a guest and is most of some packages' size.
SKIPPED_PATHS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")


def ensure_image(extra: list[str] | None = None, refresh: bool = False) -> Image:
    """The image for this request, building it (with progress on stderr) when needed."""
    extra = list(extra or [])
    for name in extra:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
            raise UserError(f"{name!r} is not a Debian package name", status=2)
    existing = find_image(extra)
    if existing and not refresh:
        return existing

    apt = PrivateApt(cache_dir() / "apt")
    progress(f"updating Debian package lists from {apt.mirror}")
    apt.update()
    kernel_name = apt.newest_kernel()
    kernel = apt.resolve([f"{kernel_name}/bookworm-backports"])
    kernel = [p for p in kernel if p.name == kernel_name]
    busybox = [p for p in apt.resolve(["busybox-static"]) if p.name == "busybox-static"]
    packages = apt.resolve(extra) if extra else []
    key_material = json.dumps([builder_version(), [p.spec for p in kernel + busybox + packages]])
    image = Image(cache_dir() / "images" / hashlib.sha256(key_material.encode()).hexdigest()[:16])
    if not image.complete():
        debs = apt.download(kernel + busybox + packages)
        _assemble(image, kernel[0], debs, busybox[0], packages)
    index = read_index()
    index[request_key(extra)] = image.directory.name
    index_path().write_text(json.dumps(index, indent=1, sort_keys=True))
    return image


def _extract(deb: Path, into: Path) -> None:
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"cannot unpack {deb.name}: {result.stderr.strip()}")


def _assemble(image: Image, kernel: Package, debs: dict[str, Path], busybox: Package, packages: list[Package]) -> None:
    image.directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=image.directory.parent, prefix=".build-") as tmp:
        staging = Path(tmp)
        progress(f"unpacking {kernel.name} {kernel.version}")
        kernel_root = staging / "kernel"
        _extract(debs[kernel.name], kernel_root)
        release = kernel.name.removeprefix("linux-image-")
        modules = KernelModules(kernel_root, release)
        busybox_root = staging / "busybox"
        _extract(debs[busybox.name], busybox_root)
        busybox_binary = (busybox_root / "bin" / "busybox").read_bytes()

        out = staging / "image"
        out.mkdir()
        shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        progress("decompressing the kernel")
        _write_vmlinux(out / "vmlinuz", out / "vmlinux")

        extra_root = staging / "extra"
        for package in packages:
            progress(f"unpacking {package.name} {package.version}")
            _extract(debs[package.name], extra_root)
        if packages:
            _write_ld_cache(extra_root)
        progress("writing the default guest initramfs")
        _write_initramfs(out / "initrd.img", resources.files("sandvmm.guest") / "init.sh",
                         busybox_binary, modules, GUEST_MODULES, extra_root if packages else None)
        progress("writing the lab initramfs")
        _write_initramfs(out / "lab-initrd.img", resources.files("sandvmm.lab") / "init.sh",
                         busybox_binary, modules, LAB_MODULES, None)
        manifest = {
            "kernel": kernel.spec, "kernel_release": release, "busybox": busybox.spec,
            "packages": [p.spec for p in packages],
            "guest_modules": modules.ordered(GUEST_MODULES), "lab_modules": modules.ordered(LAB_MODULES),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if image.directory.exists():
            shutil.rmtree(image.directory)
        out.rename(image.directory)
    progress(f"image ready: {image.directory}")


def _write_vmlinux(bzimage: Path, vmlinux: Path) -> None:
    """The ELF kernel inside a bzImage, decompressed, checked bootable."""
    import bz2
    import gzip

    from sandvmm.main.boot import BzImage, ElfKernel, read_kernel

    payload = bytes(BzImage.parse(bzimage.read_bytes(), str(bzimage)).payload)
    # Kbuild appends the decompressed size (32-bit little-endian) to all but gzip streams.
    stream, size = payload[:-4], int.from_bytes(payload[-4:], "little")
    if payload.startswith(b"\x28\xb5\x2f\xfd"):  # zstd, what Debian uses: no module in Python 3.11
        result = subprocess.run(["zstd", "-d", "-c"], input=stream, capture_output=True)
        if result.returncode != 0:
            raise UserError(f"cannot decompress {bzimage}: {result.stderr.decode(errors='replace').strip()}")
        data = result.stdout
    elif payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.decompress(stream)
    elif payload.startswith(b"BZh"):
        data = bz2.decompress(stream)
    elif payload.startswith(b"\x1f\x8b"):
        data = gzip.decompress(payload)
        size = len(data)
    else:
        raise UserError(f"{bzimage}: the kernel is compressed in a format the image builder does not know",
                        hint="Debian's kernels use zstd")
    if len(data) != size:
        raise UserError(f"{bzimage}: its kernel decompressed to {len(data)} bytes, not the {size} it declares")
    vmlinux.write_bytes(data)
    if not isinstance(read_kernel(vmlinux), ElfKernel):
        raise UserError(f"{bzimage}: its payload is not an ELF kernel")


def _write_ld_cache(root: Path) -> None:
    """Let the guest's dynamic loader find libraries in every multiarch directory."""
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "ld.so.conf").write_text(
        "/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n/usr/local/lib\n"
    )
    subprocess.run(["ldconfig", "-r", str(root)], capture_output=True)


def _write_initramfs(path: Path, init_script, busybox: bytes, modules: "KernelModules",
                     wanted: tuple[str, ...], extra_root: Path | None) -> None:
    with open(path, "wb") as out:
        cpio = CpioWriter(out)
        for directory in ("dev", "proc", "sys", "run", "tmp", "root", "etc", "lib/modules", "usr/bin", "usr/sbin", "sbin"):
            cpio.makedirs(directory)
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/port", 1, 4)
        cpio.file("bin/busybox", busybox, 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", init_script.read_bytes(), 0o755)
        order = modules.ordered(wanted)
        for name in order:
            cpio.file(f"lib/modules/{name}.ko", modules.load(name))
        cpio.file("etc/sandvmm-modules", "".join(f"{name}\n" for name in order).encode())
        if extra_root is not None:
            cpio.tree(str(extra_root), skip=SKIPPED_PATHS)
        cpio.close()


class KernelModules:
    """The modules of an unpacked kernel package, with dependencies from depmod."""

    def __init__(self, root: Path, release: str):
        self.base = root / "lib" / "modules" / release
        result = subprocess.run(["depmod", "-b", str(root), release], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"depmod failed for {release}: {result.stderr.strip()}", hint="install Debian's kmod")
        self.paths: dict[str, str] = {}
        self.depends: dict[str, list[str]] = {}
        for line in (self.base / "modules.dep").read_text().splitlines():
            target, _, deps = line.partition(":")
            name = self._name(target)
            self.paths[name] = target
            self.depends[name] = [self._name(dep) for dep in deps.split()]

    @staticmethod
    def _name(path: str) -> str:
        return os.path.basename(path).split(".ko")[0].replace("-", "_")

    def ordered(self, wanted: tuple[str, ...]) -> list[str]:
        """Every wanted module after its dependencies, each once."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            if name not in self.paths:
                raise UserError(f"kernel module {name} is not in this kernel package")
            for dep in self.depends[name]:
                visit(dep)
            order.append(name)

        for name in wanted:
            visit(name)
        return order

    def load(self, name: str) -> bytes:
        """The module as plain ELF: busybox insmod cannot read xz-compressed modules."""
        data = (self.base / self.paths[name]).read_bytes()
        return lzma.decompress(data) if self.paths[name].endswith(".xz") else data
