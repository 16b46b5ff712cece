"""The doctor classifies this host's /dev/kvm and tells the user what to do."""

from pathlib import Path

from sandvmm.doctor import kvm_status
from tests.helpers import sandvmm


def test_doctor_reports_every_check_and_gives_advice():
    result = sandvmm("doctor")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for check in ("/dev/kvm", "user namespaces", "seccomp", "tun", "memfd", "huge pages", "qemu-system-x86_64"):
        assert any(line.split(":")[0].endswith(check) for line in lines), check
    advice = lines[-1]
    assert advice.startswith("=>")
    if kvm_status().hardware:
        assert "hardware speed" in advice
    else:
        assert "sandvmm lab" in advice


def test_kvm_pvm_is_recognised_as_emulated():
    status = kvm_status()
    assert status.mode in ("hardware", "emulated", "missing")
    if Path("/sys/module/kvm_pvm").exists() and not Path("/sys/module/kvm_amd").exists() \
            and not Path("/sys/module/kvm_intel").exists():
        assert status.mode == "emulated", status
        assert "kvm_pvm" in status.detail


def test_huge_page_policy_is_read_from_the_bracketed_choice(tmp_path, monkeypatch):
    from sandvmm import doctor

    setting = tmp_path / "shmem_enabled"
    monkeypatch.setattr(doctor, "SHMEM_THP", setting)
    setting.write_text("always within_size advise [never] deny force\n")
    assert doctor.shmem_huge_pages() == "never" and not doctor._huge_pages()[0]
    assert "echo advise" in doctor._huge_pages()[1]
    setting.write_text("always within_size [advise] never deny force\n")
    assert doctor.shmem_huge_pages() == "advise" and doctor._huge_pages()[0]
    setting.unlink()
    assert doctor.shmem_huge_pages() == "unsupported"
