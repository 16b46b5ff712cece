"""Hold one idle VM for the rest of a multi-CPU lab job: `python3 -m sandvmm.lab.hold_vm`.

The lab's kernel patches its own code whenever certain static keys flip, and KVM flips
some each time a VM is created or destroyed (the scheduler's preempt notifiers, the local
APIC's "software disabled" key). Patching goes through a transient int3, and with two or
more vCPUs the lab's TCG now and then runs such an int3 after the patch is done: the
kernel oopses in __schedule or in KVM, and the job dies (docs/lab.md). A VM that exists
for the whole job, with a local APIC its guest never enables, keeps those keys on, so
the VMs the job makes and ends no longer patch anything.

Returns once the VM exists; a forked child keeps it, and the lab's power-off ends it.
"""

from __future__ import annotations

import os
import signal

from sandvmm.main import kvm


def main() -> None:
    vm = kvm.Kvm().create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    if os.fork() == 0:
        os.setsid()  # not in the job's process group
        while True:
            signal.pause()
    del vm, vcpu  # the parent's copies: the child's keep the VM


if __name__ == "__main__":
    main()
