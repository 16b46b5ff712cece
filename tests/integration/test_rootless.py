"""sandvmm run by an unprivileged user: devices are jailed in user namespaces.

The test forks, becomes uid 65534 (nobody) and calls sandvmm's entry point in that
process: the interpreter lives under /root here, which nobody could not exec, so every
module sandvmm needs is imported before the switch. nobody gets its own KVM device node
and its own copies of the kernel and initramfs, in a directory it can read.
"""

import os
import shutil
import stat
import sys
import tempfile

import pytest

import jail  # noqa: F401 -- imported before the switch, like everything below
import jail.sandbox  # noqa: F401 -- (jail loads these on first use)
import jail.seccomp  # noqa: F401
import sandvmm.cli
import sandvmm.devices.console.core  # noqa: F401
import sandvmm.devices.rng.backend  # noqa: F401
import sandvmm.devices.rng.core  # noqa: F401
import sandvmm.doctor  # noqa: F401
import sandvmm.main.probe  # noqa: F401
import sandvmm.main.run  # noqa: F401
from sandvmm.image.build import find_image

pytestmark = pytest.mark.kvm

NOBODY = 65534
KVM_MAJOR, KVM_MINOR = 10, 232


def test_an_unprivileged_user_runs_a_vm_with_jailed_devices():
    image = find_image([])
    assert image is not None
    directory = tempfile.mkdtemp(prefix="sandvmm-rootless-")
    try:
        os.chmod(directory, 0o755)
        os.mknod(f"{directory}/kvm", stat.S_IFCHR | 0o600, os.makedev(KVM_MAJOR, KVM_MINOR))
        os.chmod(f"{directory}/kvm", 0o666)  # mknod's mode is subject to the umask
        for name, source in (("vmlinuz", image.kernel), ("initrd.img", image.initrd)):
            shutil.copyfile(source, f"{directory}/{name}")
            os.chmod(f"{directory}/{name}", 0o644)
        output_read, output_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(output_read)
            os.dup2(output_write, 1)
            os.dup2(output_write, 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not pytest's capture
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.chdir(directory)
            status = 70
            try:
                sandvmm.cli.main(["run", "--kvm-device", "kvm", "--kernel", "vmlinuz", "--initrd", "initrd.img",
                                  "--serial", "type=sink,hardware=virtio-console", "--",
                                  "sh", "-c", "dd if=/dev/hwrng bs=512 count=2 2>/dev/null | wc -c; exit 7"])
            except SystemExit as exit:
                status = exit.code
            finally:
                sys.stdout.flush()
                os._exit(status)
        os.close(output_write)
        with os.fdopen(output_read) as output:
            text = output.read()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, text
        assert "1024" in text.split(), text
    finally:
        shutil.rmtree(directory)
