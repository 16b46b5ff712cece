"""Where the KVM tests run.

Tests marked `kvm` need a /dev/kvm that runs unmodified guests at hardware speed. They run
directly when this host has one (or when we are already inside the lab); otherwise they
are taken out of this session and run together inside one lab session by
tests/test_kvm_in_lab.py, which fails, with the doctor's explanation, when no lab can run.
"""

import os



def pytest_collection_modifyitems(config, items):
    kvm_items = [item for item in items if item.get_closest_marker("kvm")]
    suite_items = [item for item in items if item.get_closest_marker("lab_suite")]
    config.kvm_nodeids = []
    if os.environ.get("SANDVMM_IN_LAB") or not kvm_items:
        deselected = suite_items
    else:
        from sandvmm.doctor import kvm_status

        if kvm_status().hardware:
            deselected = suite_items
        else:
            config.kvm_nodeids = [item.nodeid for item in kvm_items]
            deselected = kvm_items
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
