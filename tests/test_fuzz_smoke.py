"""Every fuzz harness (tests/fuzz/fuzz_*.py) runs a short libFuzzer session from its seeds.

A harness that crashes, finds something, or no longer starts fails here. The number of
runs is SANDVMM_FUZZ_RUNS (default 10000); see tests/fuzz/README.md for longer sessions.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
HARNESSES = sorted(FUZZ.glob("fuzz_*.py"))
RUNS = int(os.environ.get("SANDVMM_FUZZ_RUNS", "10000"))


def test_there_is_a_harness():
    assert HARNESSES, f"no fuzz_*.py in {FUZZ}"


@pytest.mark.parametrize("harness", HARNESSES, ids=[path.stem for path in HARNESSES])
def test_harness_runs_clean(harness, tmp_path):
    seeds = FUZZ / "corpus" / harness.stem.removeprefix("fuzz_")
    # New inputs go to the first corpus directory: a scratch one, so the seeds stay as committed.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [sys.executable, str(harness), f"-runs={RUNS}", "-seed=1",
               f"-artifact_prefix={tmp_path}/", str(corpus)]
    if seeds.is_dir():
        command.append(str(seeds))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=600)
    log = result.stdout + result.stderr
    crashes = [path.name for path in tmp_path.iterdir() if path.name != "corpus"]
    assert result.returncode == 0 and not crashes, f"{harness.name} failed ({crashes}):\n{log[-4000:]}"
    done = re.search(r"^Done (\d+) runs", log, re.MULTILINE)
    assert done and int(done.group(1)) >= RUNS, f"{harness.name} did not report its runs:\n{log[-4000:]}"
    if seeds.is_dir():
        # libFuzzer read the seeds: "INITED ... corp: N/..." counts at least one input from them.
        assert re.search(r"INITED.*corp: [1-9]", log), log[-4000:]


def test_seed_corpora_belong_to_a_harness():
    """A corpus directory whose harness was renamed would silently stop being used."""
    corpora = FUZZ / "corpus"
    if not corpora.is_dir():
        pytest.skip("no corpora")
    names = {path.stem.removeprefix("fuzz_") for path in HARNESSES}
    orphans = [path.name for path in corpora.iterdir() if path.is_dir() and path.name not in names]
    assert not orphans

