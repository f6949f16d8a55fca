"""`enginepy bench --scenario poisson`: both policies serve the very same arrivals, and the report says so."""
from __future__ import annotations

import json
import re

import pytest

from enginepy.bench_poisson import arrivals
from enginepy.cli import main


def test_arrivals_are_seeded_poisson():
    a, b = arrivals(4.0, 200, (5, 30), seed=3), arrivals(4.0, 200, (5, 30), seed=3)
    assert a == b and a != arrivals(4.0, 200, (5, 30), seed=4)
    times = [t for t, _, _ in a]
    assert times == sorted(times)
    mean_gap = times[-1] / len(times)
    assert 0.2 < mean_gap < 0.3  # 1 / rate = 0.25 s
    assert all(5 <= d <= 30 for _, d, _ in a)


def test_poisson_scenario_runs_both_policies_on_the_same_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINEPY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "poisson.json"
    code = main(["bench", "--scenario", "poisson", "--model", "tiny", "--device", "cpu", "--dtype", "float32",
                 "--requests", "5", "--rate", "50", "--durations", "0.04,0.12", "--max-batch", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    cont, static = result["continuous"], result["static"]
    assert cont["requests"] == static["requests"] == 5
    assert cont["audio_s"] == pytest.approx(static["audio_s"])  # the same jobs, whatever the policy
    expected = sum(int(d * 50) for _, d, _ in arrivals(50, 5, (0.04, 0.12), seed=0)) / 50
    assert cont["audio_s"] == pytest.approx(expected)
    for policy in (cont, static):
        assert policy["latency_s"]["p50"] >= policy["queue_s"]["p50"] >= 0
    assert cont["steps"] > 0 and static["steps"] > 0
    assert result["environment"]["device"]


@pytest.mark.parametrize("args,match", [
    (["--rate", "0"], "--rate must be a positive number"),
    (["--durations", "3"], "--durations must be LO,HI seconds"),
    (["--durations", "5,40"], r"--durations must satisfy 0 < LO <= HI <= 30"),
])
def test_poisson_options_are_validated(tmp_path, capsys, args, match):
    code = main(["bench", "--scenario", "poisson", "--model", "tiny", "--device", "cpu",
                 "--out", str(tmp_path / "x.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
