"""A tiny smoke run of the benchmark harness, and the README table against the committed results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from enginepy.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import report  # noqa: E402


def test_bench_smoke_writes_json_table_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGINEPY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1,2",
                 "--duration", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device"].startswith("CPU") and env["device"] in printed
    assert env["torch"] and env["transformers"] and "commit" in env
    engines = {(r["engine"], r["batch"]) for r in result["rows"]}
    assert engines == {("enginepy-reference", 1), ("enginepy-reference", 2), ("transformers", 1), ("transformers", 2)}
    for row in result["rows"]:
        assert row["steps"] == 5 + 3 and row["frames"] == 5
        assert 0 < row["ms_step_p50"] <= row["ms_step_p99"]
        assert row["render_s"] > 0 and abs(row["audio_s_per_s"] - row["batch"] * 0.1 / row["render_s"]) < 1e-6
        if row["engine"] != "transformers":
            twin = next(r for r in result["rows"] if r["engine"] == "transformers" and r["batch"] == row["batch"])
            assert abs(row["speedup_vs_transformers"] - twin["render_s"] / row["render_s"]) < 1e-9
    text = report.table([result])
    assert text.count(env["device"]) == 4
    report.plot([result], str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_the_int8_cpu_decoder_and_labels_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGINEPY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--dtype", "int8", "--batch", "1",
                 "--duration", "0.1", "--no-transformers", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["dtype"]) for r in rows] == [("enginepy-reference", "int8")]
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--dtype", "int4"]) == 2
    assert "--dtype must be one of float32, float16, bfloat16, int8; got 'int4'" in capsys.readouterr().err


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--model", "tiny", "--batch", "0,2"]) == 2
    assert "--batch must be comma-separated positive integers; got '0,2'" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny", "--backends", "reference,warp"]) == 2
    assert "--backends must list names from reference, fast; got 'warp'" in capsys.readouterr().err


def test_readme_table_matches_committed_results():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
