"""Runs every `kvm` test of this session inside one lab session (see conftest.py)."""

import subprocess
import sys

import pytest

from sandvmm.doctor import kvm_status
from sandvmm.errors import UserError
from sandvmm.image.build import ensure_image
from sandvmm.lab.runner import LAB_FAILED, qemu_binary
from tests.images import KVM_TEST_IMAGES

LAB_MEM_MIB = 8192  # room for guests of 4 GiB and more inside the lab


@pytest.mark.lab_suite
def test_kvm_tests_pass_inside_the_lab(request, capsys):
    nodeids = request.config.kvm_nodeids
    try:
        qemu_binary()
    except UserError as error:
        pytest.fail(f"the kvm tests cannot run: /dev/kvm is {kvm_status().detail}, and the lab cannot start: {error}"
                    " (see `sandvmm doctor`)")
    for extra in KVM_TEST_IMAGES:
        ensure_image(extra)
    command = [sys.executable, "-m", "sandvmm", "lab", "--mem", str(LAB_MEM_MIB), "--timeout", "2700", "--",
               sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "kvm", "-rA", *nodeids]
    with capsys.disabled():
        print(f"\n--- {len(nodeids)} kvm test(s) inside the lab ---", flush=True)
        status = subprocess.run(command, cwd=request.config.rootpath).returncode
        if status == LAB_FAILED:
            # The lab's own kernel died (TCG's nested SVM has crashed under load, rarely):
            # that says nothing about our tests, so give them one more lab.
            print("\n--- the lab itself crashed; running the kvm tests in a new lab ---", flush=True)
            status = subprocess.run(command, cwd=request.config.rootpath).returncode
    assert status == 0, f"the kvm tests inside the lab failed (exit status {status})"
