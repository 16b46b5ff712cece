"""A private apt: Debian packages fetched without touching the machine's apt configuration.

Everything apt keeps (sources list, package lists, downloaded .debs) lives under our cache
directory; the system's sources, preferences, status file and locks are never read or
written. Only the mirror address is taken from the system's configuration, so that we use
whatever Debian mirror the machine is set up for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sandvmm.errors import UserError

SUITES = ("bookworm", "bookworm-backports")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
UNREACHABLE = re.compile(r"Failed to fetch|Could not resolve|Unable to connect|Temporary failure|Connection failed")


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


def system_mirror() -> str:
    """The Debian mirror the host's apt uses (or $SANDVMM_DEBIAN_MIRROR)."""
    if os.environ.get("SANDVMM_DEBIAN_MIRROR"):
        return os.environ["SANDVMM_DEBIAN_MIRROR"].rstrip("/")
    files: list[Path] = []
    for source in SYSTEM_SOURCES:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.exists():
            files.append(source)
    for path in files:
        text = path.read_text(errors="replace")
        # deb822 stanzas (URIs: ... / Suites: ...) and one-line entries (deb URI suite ...).
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1).rstrip("/")
        for line in text.splitlines():
            match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if match:
                return match.group(1).rstrip("/")
    raise UserError(
        "no Debian bookworm mirror found in /etc/apt/sources.list{,.d}",
        hint="set SANDVMM_DEBIAN_MIRROR to a Debian mirror URL",
    )


class PrivateApt:
    """apt-get/apt-cache run against a state directory of our own."""

    def __init__(self, root: Path, mirror: str | None = None):
        self.root = root
        self.mirror = mirror or system_mirror()
        self.archives = root / "archives"
        for sub in ("lists/partial", "archives/partial", "cache", "etc"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        sources = root / "etc" / "sources.list"
        sources.write_text(
            "".join(f"deb [signed-by={KEYRING}] {self.mirror} {suite} main\n" for suite in SUITES)
        )
        (root / "status").touch()  # an empty dpkg status: every dependency counts as missing

    def _options(self) -> list[str]:
        settings = {
            "Dir::Etc::SourceList": self.root / "etc" / "sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": self.root / "lists",
            "Dir::State::status": self.root / "status",
            "Dir::Cache": self.root / "cache",
            "Dir::Cache::archives": self.archives,
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
            "APT::Architecture": "amd64",
            "APT::Install-Recommends": "0",
        }
        return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [tool, *self._options(), *args], cwd=cwd, capture_output=True, text=True
            )
        except FileNotFoundError:
            raise UserError(f"{tool} not found", hint="sandvmm builds images with Debian's apt") from None

    def has_lists(self) -> bool:
        return any((self.root / "lists").glob("*_Packages*"))

    def update(self) -> None:
        result = self._run("apt-get", "update")
        failed = UNREACHABLE.search(result.stdout + result.stderr)
        if failed or result.returncode != 0 or not self.has_lists():
            detail = _first_problem(result.stdout + result.stderr)
            raise UserError(
                f"cannot reach the Debian package registry at {self.mirror} ({detail})",
                hint="check the network, or set SANDVMM_DEBIAN_MIRROR",
            )

    def newest_kernel(self) -> str:
        """The linux-image-6.12.*-amd64 package that bookworm-backports' metapackage points to."""
        result = self._run("apt-cache", "depends", "linux-image-amd64/bookworm-backports")
        match = re.search(r"Depends:\s*(linux-image-6\.12\.\S+-amd64)\b", result.stdout)
        if not match:
            raise UserError("bookworm-backports offers no linux-image-6.12.*-amd64 kernel", hint="try again later")
        return match.group(1)

    def resolve(self, names: list[str]) -> list[Package]:
        """The packages plus everything they depend on (not recommends), with versions."""
        result = self._run("apt-get", "-s", "install", *names)
        unknown = re.findall(r"Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate", result.stdout + result.stderr)
        if unknown:
            name = next(n for pair in unknown for n in pair if n)
            raise UserError(f"unknown Debian package {name!r}", hint="check the name with `apt-cache search`", status=2)
        if result.returncode != 0:
            raise UserError(f"cannot resolve packages {' '.join(names)}: {_first_problem(result.stdout + result.stderr)}")
        return [Package(m[0], m[1]) for m in re.findall(r"^Inst (\S+) \((\S+)", result.stdout, re.M)]

    def deb_path(self, package: Package) -> Path | None:
        version = package.version.replace(":", "%3a")
        found = list(self.archives.glob(f"{package.name}_{version}_*.deb"))
        return found[0] if found else None

    def download(self, packages: list[Package]) -> dict[str, Path]:
        """Fetch the .debs not already cached; show apt's per-file progress on stderr."""
        missing = [p for p in packages if self.deb_path(p) is None]
        if missing:
            progress(f"downloading {len(missing)} Debian package(s)")
            proc = subprocess.Popen(
                ["apt-get", *self._options(), "download", *(p.spec for p in missing)],
                cwd=self.archives, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            output = []
            for line in proc.stdout:
                output.append(line)
                if line.startswith("Get:"):
                    progress("  " + line.split(" ", 1)[1].strip())
            if proc.wait() != 0 or any(self.deb_path(p) is None for p in missing):
                detail = _first_problem("".join(output))
                if UNREACHABLE.search(detail):
                    raise UserError(f"cannot reach the Debian package registry at {self.mirror} ({detail})")
                raise UserError(f"downloading Debian packages failed: {detail}")
        return {p.name: self.deb_path(p) for p in packages}


def _first_problem(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("E:", "W:", "Err:")):
            return line.strip()
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def progress(message: str) -> None:
    print(f"sandvmm image: {message}", file=sys.stderr, flush=True)
