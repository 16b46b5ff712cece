"""`sandvmm doctor`: what this host has for running VMs, and what to do about what it lacks.

The KVM check matters most. A /dev/kvm can be hardware-assisted (VT-x/AMD-V) or a
software one such as kvm_pvm, which emulates unmodified guest code about a thousand times
slower and cannot boot a stock kernel. Flags alone cannot tell: a kvm_pvm host may show
no vmx/svm flag while a nested cloud VM may show one that does not work. So we also time a
tiny 64-bit guest (sandvmm.main.probe) and judge by its speed.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Hardware KVM runs the probe loop at hundreds of millions of iterations per second,
# emulation at about one million. Short probes are dominated by the cost of entering the
# guest (large when KVM itself is nested under emulation, as in the lab), so a rate above
# EMULATION_RATE is enough where a hardware KVM module is loaded; with no module to go
# by, the rate alone decides.
HARDWARE_RATE = 50e6
EMULATION_RATE = 5e6
PROBE_ITERATIONS = 200_000
CLONE_NEWUSER = 0x10000000


@dataclass
class KvmStatus:
    mode: str  # "hardware", "emulated" or "missing"
    detail: str

    @property
    def hardware(self) -> bool:
        return self.mode == "hardware"


def kvm_modules() -> list[str]:
    return [name for name in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(f"/sys/module/{name}").exists()]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def classify(modules: list[str], rate: float) -> str:
    """'hardware' or 'emulated', from the loaded KVM modules and a probe's loop rate."""
    if {"kvm_intel", "kvm_amd"} & set(modules):
        return "hardware" if rate >= EMULATION_RATE else "emulated"
    if "kvm_pvm" in modules:
        return "emulated"
    return "hardware" if rate >= HARDWARE_RATE else "emulated"


def kvm_status() -> KvmStatus:
    """Classify /dev/kvm; cached in $SANDVMM_KVM_STATUS so a test session measures once."""
    cached = os.environ.get("SANDVMM_KVM_STATUS")
    if cached:
        return KvmStatus(**json.loads(cached))
    status = _measure_kvm()
    os.environ["SANDVMM_KVM_STATUS"] = json.dumps(asdict(status))
    return status


def _measure_kvm() -> KvmStatus:
    if not os.path.exists("/dev/kvm"):
        return KvmStatus("missing", "/dev/kvm does not exist (no KVM module loaded)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmStatus("missing", "/dev/kvm is not accessible to this user (add yourself to the kvm group)")
    # The probe runs in a child so that a wedged /dev/kvm cannot take the caller with it.
    probe = subprocess.run([sys.executable, "-m", "sandvmm.main.probe", "--iterations", str(PROBE_ITERATIONS), "--json"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return KvmStatus("missing", f"/dev/kvm cannot run a guest: {probe.stderr.strip() or probe.stdout.strip()}")
    rate = json.loads(probe.stdout)["rate"]
    modules = kvm_modules()
    flags = _cpu_flags() & {"vmx", "svm"}
    described = (f"{','.join(modules) or 'unknown module'}, cpu flags {'/'.join(sorted(flags)) or 'without vmx/svm'},"
                 f" a test guest ran {rate / 1e6:.2f} M loops/s")
    if classify(modules, rate) == "hardware":
        return KvmStatus("hardware", f"hardware-assisted ({described})")
    return KvmStatus("emulated", f"emulated, far too slow for a stock kernel ({described})")


def _user_namespaces() -> tuple[bool, str]:
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.unshare(CLONE_NEWUSER) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return True, "available"
    return False, "unshare(CLONE_NEWUSER) is refused (check kernel.unprivileged_userns_clone / user.max_user_namespaces)"


def _seccomp() -> tuple[bool, str]:
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" not in status:
        return False, "the kernel has no seccomp support"
    try:
        importlib.import_module("pyseccomp")
    except Exception as error:  # pyseccomp loads libseccomp with ctypes and may fail in several ways
        return False, f"pyseccomp cannot load libseccomp ({error}); apt-get install libseccomp2"
    return True, "available (pyseccomp and libseccomp)"


def _tun() -> tuple[bool, str]:
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
        return True, "/dev/net/tun opens"
    except OSError as error:
        return False, f"/dev/net/tun: {error.strerror} (user-mode networking still works)"


def _memfd() -> tuple[bool, str]:
    try:
        os.close(os.memfd_create("sandvmm-doctor", os.MFD_ALLOW_SEALING))
        return True, "available"
    except OSError as error:
        return False, f"memfd_create failed: {error.strerror}"


SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def shmem_huge_pages() -> str:
    """The host's huge-page policy for shared memory (guest RAM is a memfd), e.g. "never"."""
    try:
        text = SHMEM_THP.read_text()
    except OSError:
        return "unsupported"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else text.strip()


def _huge_pages() -> tuple[bool, str]:
    policy = shmem_huge_pages()
    if policy in ("advise", "always", "within_size", "force"):
        return True, f"shared memory may use huge pages ({policy}): guest RAM gets them"
    return False, (f"shared memory huge pages are '{policy}': guests boot slower; "
                   f"as root, `echo advise > {SHMEM_THP}` lets sandvmm ask for them")


def _qemu() -> tuple[bool, str]:
    path = shutil.which("qemu-system-x86_64")
    return (True, path) if path else (False, "not installed: apt-get install qemu-system-x86 (needed by `sandvmm lab`)")


def report() -> int:
    """Print one line per check and the advice; 1 when this host can run no guest at all."""
    kvm = kvm_status()
    checks = [
        ("/dev/kvm", kvm.hardware, kvm.detail),
        ("user namespaces", *_user_namespaces()),
        ("seccomp", *_seccomp()),
        ("tun", *_tun()),
        ("memfd", *_memfd()),
        ("huge pages", *_huge_pages()),
        ("qemu-system-x86_64", *_qemu()),
    ]
    for name, ok, detail in checks:
        print(f"{'ok' if ok else 'no':3} {name}: {detail}")
    qemu_ok = checks[-1][1]
    if kvm.hardware:
        print("=> this host runs guests at hardware speed directly: `sandvmm run -- CMD`")
        return 0
    if qemu_ok:
        print("=> this host's KVM cannot run unmodified guests at speed: use `sandvmm lab -- CMD`, which runs CMD"
              " where /dev/kvm is a real kvm_amd (e.g. `sandvmm lab -- sandvmm run -- uname -a`)")
        return 0
    print("=> this host can run no guest: it has no hardware KVM, and `sandvmm lab` needs qemu-system-x86")
    return 1
