"""Finding a built guest image in the cache: all that `sandvmm run` needs when one exists.

Kept apart from the builder (build.py), whose imports would otherwise be paid at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 4  # bump when the image layout changes (init scripts are hashed: builder_version)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # sandvmm/, which holds guest/ and lab/


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sandvmm"


@dataclass(frozen=True)
class Image:
    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def lab_initrd(self) -> Path:
        return self.directory / "lab-initrd.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())

    def complete(self) -> bool:
        return (self.directory / "manifest.json").exists()


def builder_version() -> str:
    """BUILDER_VERSION and the init scripts' digest: a changed script means a new image."""
    digest = hashlib.sha256()
    for package in ("guest", "lab"):
        digest.update((PACKAGE_ROOT / package / "init.sh").read_bytes())
    return f"{BUILDER_VERSION}-{digest.hexdigest()[:12]}"


def request_key(extra: list[str]) -> str:
    # The builder version is part of the key so that a changed init script is rebuilt.
    return f"v{builder_version()}:" + (",".join(sorted(set(extra))) or "default")


def index_path() -> Path:
    return cache_dir() / "images" / "index.json"


def read_index() -> dict[str, str]:
    try:
        return json.loads(index_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def find_image(extra: list[str] | None = None) -> Image | None:
    """The image built for this request, if any; never touches the network."""
    name = read_index().get(request_key(extra or []))
    image = Image(cache_dir() / "images" / name) if name else None
    return image if image and image.complete() else None
