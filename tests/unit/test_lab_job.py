"""The job script `sandvmm lab` writes (no lab needed)."""

from pathlib import Path

from sandvmm.lab.runner import LabConfig, job_script


def test_a_multi_cpu_job_holds_an_idle_vm_before_its_command():
    single = job_script(LabConfig(["true"], cwd=Path("/"), env={}))
    double = job_script(LabConfig(["true"], cwd=Path("/"), env={}, cpus=2))
    assert "hold_vm" not in single
    lines = double.splitlines()
    hold = next(index for index, line in enumerate(lines) if "-m sandvmm.lab.hold_vm" in line)
    assert hold < lines.index("    true")
