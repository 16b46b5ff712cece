"""The speed probe really runs a long-mode guest to completion under KVM."""
import json

import pytest

from sandvmm.main import kvm, probe
from sandvmm.main.cpu import EFER_LMA

pytestmark = pytest.mark.kvm

ITERATIONS = 10_000


def test_measure_runs_all_iterations_and_reports_rate():
    result = probe.measure(ITERATIONS)
    assert result.iterations == ITERATIONS
    assert result.seconds > 0
    assert result.rate > 0
    assert result.rate == pytest.approx(ITERATIONS / result.seconds)


def test_guest_final_state_proves_the_loop_completed(monkeypatch):
    """Capture the vCPU registers at HLT: rcx counted down to 0, rip past hlt."""
    final = {}
    real_run_to_halt = probe._run_to_halt

    def spy(vcpu):
        out = real_run_to_halt(vcpu)
        final["regs"], final["sregs"] = vcpu.get_regs(), vcpu.get_sregs()
        return out

    monkeypatch.setattr(probe, "_run_to_halt", spy)
    probe.measure(ITERATIONS)

    regs, sregs = final["regs"], final["sregs"]
    code = probe.guest_code(ITERATIONS)
    hlt_end = probe.CODE_ADDR + code.index(b"\xF4") + 1
    assert regs.rcx == 0
    assert regs.rax == probe.DONE_MAGIC
    assert regs.rip == hlt_end
    assert sregs.efer & EFER_LMA and sregs.cs.l == 1  # really ran in long mode


def test_guest_that_stops_early_is_rejected(monkeypatch):
    # Halt straight away: no loop, no completion OUT.
    monkeypatch.setattr(probe, "guest_code", lambda n: b"\xF4")
    with pytest.raises(probe.ProbeError, match="without reporting completion"):
        probe.measure(ITERATIONS)


def test_unexpected_exit_names_reason_and_rip(monkeypatch):
    # ud2 with no IDT triple-faults -> KVM_EXIT_SHUTDOWN. Where RIP then points differs:
    # kvm_pvm leaves it at the fault, AMD-V has already reset the vCPU to 0xfff0.
    monkeypatch.setattr(probe, "guest_code", lambda n: b"\x0F\x0B")
    with pytest.raises(probe.ProbeError, match=r"SHUTDOWN at rip=0x(100000|fff0)"):
        probe.measure(ITERATIONS)


def test_cli_json(capsys):
    assert probe.main(["--iterations", str(ITERATIONS), "--json"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    data = json.loads(line)
    assert data["iterations"] == ITERATIONS and data["rate"] > 0 and data["seconds"] > 0


def test_cli_reports_unavailable_device_in_one_line(capsys):
    assert probe.main(["--device", "/nonexistent/kvm"]) == 1
    err = capsys.readouterr().err
    assert err == "probe: error: cannot open /nonexistent/kvm: No such file or directory\n"


def test_kvm_unavailable_message():
    with pytest.raises(kvm.KvmUnavailable, match=r"^cannot open /nonexistent/kvm: "):
        kvm.Kvm("/nonexistent/kvm")
