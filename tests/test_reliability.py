"""SIGKILL (harvest, train, sweep) and disk-full trials (issue 7) with the harness of
``pipeline.bench.reliability``, plus a check that the committed RELIABILITY.md reports enough
trials and nothing lost."""

import random
import re
from pathlib import Path

import pytest

from pipeline.bench import reliability

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_harvest_training_and_sweep_resume_to_identical_results(shared_data, tmp_path):
    rng = random.Random(7)
    trials = reliability.run_harvest_trials(1, tmp_path, shared_data, rng, n_tokens=4096)
    trials += reliability.run_train_trials(1, tmp_path, tmp_path / "harvest_reference", rng)
    trials += reliability.run_sweep_trials(1, tmp_path, tmp_path / "harvest_reference", rng)
    assert [t.kind for t in trials] == ["harvest", "train", "sweep"]
    for t in trials:
        assert t.left_valid, t
        assert t.resumed_identical, t


@pytest.mark.slow
def test_a_harvest_whose_disk_fills_at_random_writes_resumes_to_an_identical_cache(shared_data, tmp_path, smollm2):
    trials = reliability.run_disk_full_trials(2, tmp_path, shared_data, random.Random(3), n_tokens=4096, model=smollm2)
    assert [t.kind for t in trials] == ["disk_full"] * 2
    for t in trials:
        assert t.state_at_kill.startswith("stopped: "), t
        assert t.left_valid and t.resumed_identical, t


def test_same_content_sees_a_single_changed_value():
    import numpy as np

    a = {"x": np.zeros((4, 3), dtype=np.float16), "attrs": '{"n": 1}'}
    b = {"x": a["x"].copy(), "attrs": '{"n": 1}'}
    assert reliability.same_content(a, b)
    b["x"][2, 1] = np.float16(1e-3)
    assert not reliability.same_content(a, b)
    assert not reliability.same_content(a, {**a, "attrs": '{"n": 2}'})


def test_reliability_md_reports_enough_trials_and_nothing_lost():
    text = (ROOT / "RELIABILITY.md").read_text()
    faults = "|".join(re.escape(name) for name in reliability.FAULTS.values())
    rows = re.findall(rf"^\| ({faults}) \| (\d+) \| (\d+) \| (\d+) \|", text, flags=re.M)
    counts = {fault: (int(n), int(bad), int(diff)) for fault, n, bad, diff in rows}
    assert counts["SIGKILL during harvest"][0] >= 20 and counts["SIGKILL during train"][0] >= 5
    assert counts["SIGKILL during sweep"][0] >= 5
    assert counts["disk full during harvest"][0] >= 10
    assert all(bad == 0 and diff == 0 for _, bad, diff in counts.values())
    per_trial = re.findall(r"^\| \d+ \| (harvest|train|sweep|disk_full) \| (?:[\d.]+ s|write \d+ of \d+) \| [^|]+ \| "
                           r"(True|False) \| (True|False) \|$", text, flags=re.M)
    assert len(per_trial) == sum(n for n, _, _ in counts.values())
    assert all(valid == "True" and same == "True" for _, valid, same in per_trial)
