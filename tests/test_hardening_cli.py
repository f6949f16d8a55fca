"""The command line under bad input: every output path is checked before the model is loaded, files are
written in the format their extension names, numeric edge cases are refused, and each refusal is one line on
stderr with exit code 2. A run says which device, dtype, backend and seed it used."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from enginepy.cli import main

NO_MODEL = "/nonexistent/model"  # a path check that passes would fail on this model instead


def _refused(capsys, argv: list[str]) -> str:
    """Run main(argv) in-process; assert exit 2 with exactly one stderr line; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def places(tmp_path):
    (tmp_path / "a_file.wav").write_bytes(b"RIFF")
    (tmp_path / "a_dir").mkdir()
    return tmp_path


OUTPUT_CASES = [
    ("proc", ["--out", "/proc/o.wav"], "--out /proc/o.wav: cannot create files in /proc"),
    ("existing-dir", ["--out", "{t}/a_dir"], "--out {t}/a_dir is an existing directory; give a file path"),
    ("empty", ["--out", ""], "--out must be a file path; got ''"),
    ("under-a-file", ["--out", "{t}/a_file.wav/o.wav"], "--out {t}/a_file.wav/o.wav: {t}/a_file.wav is a file, not a directory"),
    ("mp3", ["--out", "{t}/o.mp3"], "--out must end in .wav, .flac, .ogg (the extension picks the format); got '{t}/o.mp3'"),
    ("no-extension", ["--out", "{t}/o"], "--out must end in .wav, .flac, .ogg"),
    ("tokens-txt", ["--tokens-out", "{t}/codes.txt"], "--tokens-out must end in .npy (codes are written as a NumPy array)"),
    ("tokens-same-as-out", ["--out", "{t}/x.wav", "--tokens-out", "{t}/x.wav"], "--tokens-out must end in .npy"),
    ("tokens-proc", ["--tokens-out", "/proc/c.npy"], "--tokens-out /proc/c.npy: cannot create files in /proc"),
    ("tokens-dir", ["--tokens-out", "{t}/a_dir"], "--tokens-out {t}/a_dir is an existing directory"),
]


@pytest.mark.parametrize("case,args,message", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_generate_output_paths_are_checked_before_loading(places, capsys, case, args, message):
    t = str(places)
    args = [a.format(t=t) for a in args]
    out = [] if "--out" in args else ["--out", f"{t}/ok.wav"]
    line = _refused(capsys, ["generate", "jazz", "--model", NO_MODEL, "--device", "cpu", *out, *args])
    assert line == f"enginepy: error: {message.format(t=t)}" or line.startswith(f"enginepy: error: {message.format(t=t)}")
    assert sorted(os.listdir(places)) == ["a_dir", "a_file.wav"]  # nothing written, not even a partial result


def test_two_outputs_naming_one_file_are_refused(places, capsys):
    os.symlink(places / "o.wav", places / "link.npy")
    line = _refused(capsys, ["generate", "jazz", "--model", NO_MODEL, "--out", str(places / "o.wav"),
                             "--tokens-out", str(places / "link.npy")])
    assert line == f"enginepy: error: --out and --tokens-out both name {places / 'link.npy'}; give them different paths"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(places, capsys):
    ro = places / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    line = _refused(capsys, ["generate", "jazz", "--model", NO_MODEL, "--out", str(ro / "o.wav")])
    assert line == f"enginepy: error: --out {ro / 'o.wav'}: cannot create files in {ro} (Permission denied)"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--model", "tiny", "--out", "/proc/b.json"], "--out /proc/b.json: cannot create files in /proc"),
        (["bench", "--model", "tiny", "--out", "{t}/a_dir"], "--out {t}/a_dir is an existing directory"),
        (["bench", "--model", "tiny", "--out", "{t}/b.txt"], "--out must end in .json (results are written as JSON)"),
        (["convert", NO_MODEL, "{t}/a_file.wav"], "destination {t}/a_file.wav exists and is not a directory"),
        (["convert", NO_MODEL, "/proc/converted"], "destination /proc/converted: cannot create files in /proc"),
        (["convert", NO_MODEL, ""], "destination must be a directory path; got ''"),
        (["demo", "--model", NO_MODEL, "--out", "{t}/demo.mp3"], "--out must end in .wav, .flac, .ogg"),
    ],
)
def test_other_commands_check_their_outputs_first(places, capsys, argv, message):
    t = str(places)
    line = _refused(capsys, [a.format(t=t) for a in argv])
    assert line.startswith(f"enginepy: error: {message.format(t=t)}")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--duration", "0"], r"--duration must be in (0, 30] seconds; got 0.0"),
        (["--duration", "45"], r"--duration must be in (0, 30] seconds; got 45.0"),
        (["--duration", "1e400"], "--duration must be in (0, 30] seconds; got inf"),
        (["--top-k", "-2"], "top_k must be an integer in [0, vocabulary size]; got -2"),
        (["--top-k", "999"], "top_k must be an integer in [0, 32]; got 999"),  # known once the model is loaded
        (["--top-p", "2"], "top_p must be in [0, 1]; got 2.0"),
        (["--top-p", "1e400"], "top_p must be a finite number; got inf"),
        (["--temperature", "-1"], "temperature must be >= 0 (0 means greedy); got -1.0"),
        (["--temperature", "1e-40"], "temperature must be 0 (greedy) or at least 0.0001; got 1e-40"),
        (["--temperature", "5e-324"], "temperature must be 0 (greedy) or at least 0.0001; got 5e-324"),
        (["--cfg-coef", "-0.5"], "cfg_coef must be >= 0; got -0.5"),
        (["--cfg-coef", "1e39"], "cfg_coef must be at most 1e+06; got 1e+39"),
        (["--seed", "-1"], "seed must be None or an integer in [0, 2**63 - 1]; got -1"),
        (["--backend", "warp"], "--backend must be one of reference, fast; got 'warp'"),
        (["--device", "gpu"], "device must be 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
        (["--device", "cpu:5"], "device 'cpu:5': the CPU is one device (its cores are used by threads); use 'cpu'"),
        (["--dtype", "int4"], "--dtype must be one of float32, float16, bfloat16, int8; got 'int4'"),
        (["--max-text-len", "600"], "--max-text-len must be an integer in [1, 512]; got 600"),
        (["--model", NO_MODEL], f"model directory {NO_MODEL} does not exist"),
        (["--top-k", "1e3"], None),  # argparse: one line too
    ],
)
def test_bad_parameters_exit_2_in_one_line(tiny_hf, tmp_path, capsys, args, message):
    line = _refused(capsys, ["generate", "jazz", "--model", tiny_hf, "--device", "cpu", "--out", str(tmp_path / "o.wav"),
                             *args])
    if message is None:
        assert line == "enginepy generate: error: argument --top-k: invalid int value: '1e3' (see enginepy generate --help)"
    else:
        assert line.startswith(f"enginepy: error: {message}")
    assert not os.path.exists(tmp_path / "o.wav")


def test_help_describes_the_defaults_truthfully():
    r = subprocess.run([sys.executable, "-m", "enginepy", "generate", "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert "float32 on CPU" not in text
    assert "--dtype DTYPE decoder dtype: float32 | float16 | bfloat16 | int8 (int8: CPU reference backend only; default: the engine's default for the device)" in text
    assert "--backend BACKEND reference | fast (default: the engine's default for the device)" in text


SETTINGS = re.compile(r"^model (\S+) \| device cpu \| dtype (\w+) \| backend (\w+) \| seed (\d+) \(row i uses seed \+ i\)$", re.M)


def test_a_run_reports_its_settings_and_a_drawn_seed_reproduces_it(tiny_hf, tmp_path, capsys):
    common = ["generate", "jazz", "--model", tiny_hf, "--device", "cpu", "--dtype", "float32", "--duration", "0.2",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a.wav"), "--tokens-out", str(tmp_path / "a.npy")]) == 0
    match = SETTINGS.search(capsys.readouterr().out)
    assert match and match.group(1) == tiny_hf and match.group(2) == "float32" and match.group(3) == "reference"
    seed = match.group(4)
    assert main([*common, "--seed", seed, "--out", str(tmp_path / "b.wav"), "--tokens-out", str(tmp_path / "b.npy")]) == 0
    assert f"| seed {seed} (row i uses seed + i)" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert main([*common, "--greedy", "--out", str(tmp_path / "c.wav")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("| backend reference | greedy")


def test_audio_is_written_in_the_format_its_extension_names(tiny_hf, tmp_path, capsys):
    common = ["generate", "jazz", "--model", tiny_hf, "--device", "cpu", "--dtype", "float32", "--duration", "0.3",
              "--seed", "5", "--quiet"]
    for ext in ("wav", "flac", "ogg"):
        assert main([*common, "--out", str(tmp_path / f"o.{ext}"), "--tokens-out", str(tmp_path / f"{ext}.npy")]) == 0
    capsys.readouterr()
    info = {ext: sf.info(str(tmp_path / f"o.{ext}")) for ext in ("wav", "flac", "ogg")}
    assert [(i.format, i.subtype, i.samplerate) for i in info.values()] == [
        ("WAV", "PCM_16", 800), ("FLAC", "PCM_16", 800), ("OGG", "VORBIS", 800)]
    wav, _ = sf.read(tmp_path / "o.wav", dtype="int16")
    flac, _ = sf.read(tmp_path / "o.flac", dtype="int16")
    assert np.array_equal(wav, flac) and np.abs(wav).max() > 0  # lossless: the same samples
    ogg, _ = sf.read(tmp_path / "o.ogg", dtype="float32")
    assert ogg.shape == wav.shape
    assert np.load(tmp_path / "wav.npy").shape == (1, 4, 15)


def test_prompt_length_limit_follows_max_text_len(tiny_hf, tmp_path, capsys):
    line = _refused(capsys, ["generate", " ".join(["jazz"] * 600), "--model", tiny_hf, "--device", "cpu",
                             "--out", str(tmp_path / "o.wav")])
    assert line.startswith("enginepy: error: descriptions[0] is 601 tokens long; the limit is 256 (raise max_text_len")
    assert not os.path.exists(tmp_path / "o.wav")
    line = _refused(capsys, ["generate", " ".join(["jazz"] * 20), "--model", tiny_hf, "--device", "cpu",
                             "--max-text-len", "12", "--out", str(tmp_path / "o.wav")])
    assert "is 21 tokens long; the limit is 12" in line
    assert main(["generate", " ".join(["jazz"] * 300), "--model", tiny_hf, "--device", "cpu", "--max-text-len", "512",
                 "--duration", "0.1", "--quiet", "--out", str(tmp_path / "o.wav")]) == 0
    assert os.path.isfile(tmp_path / "o.wav")


def test_refusals_through_the_real_command_line(tiny_hf, places):
    """The same promises in real processes (exit status, stderr), one refusal per kind, run side by side."""
    t = str(places)
    cases = [
        (["generate", "jazz", "--model", NO_MODEL, "--out", "/proc/o.wav"], "--out /proc/o.wav: cannot create files in /proc"),
        (["generate", "jazz", "--model", NO_MODEL, "--out", f"{t}/o.wav", "--tokens-out", f"{t}/c.txt"],
         "--tokens-out must end in .npy"),
        (["generate", "jazz", "--model", NO_MODEL, "--out", f"{t}/o.wav", "--temperature", "1e-40"],
         "temperature must be 0 (greedy) or at least 0.0001"),
        (["generate", "jazz", "--model", NO_MODEL, "--out", f"{t}/o.wav", "--device", "cpu:5"], "device 'cpu:5'"),
        (["generate", " ".join(["jazz"] * 600), "--model", tiny_hf, "--device", "cpu", "--out", f"{t}/o.wav"],
         "descriptions[0] is 601 tokens long"),
        (["convert", tiny_hf, f"{t}/a_file.wav"], f"destination {t}/a_file.wav exists and is not a directory"),
        (["bench", "--out", f"{t}/a_dir"], f"--out {t}/a_dir is an existing directory"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "enginepy", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for (argv, message), proc in zip(cases, procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"enginepy: error: {message}"), (argv, err)
    assert sorted(os.listdir(places)) == ["a_dir", "a_file.wav"]


def test_bench_records_the_top_k_it_used(tmp_path):
    from enginepy.bench import run_bench

    result = run_bench(model="tiny", device="cpu", dtype="float32", duration=0.1, transformers=False,
                       cache_dir=str(tmp_path), log=lambda line: None)
    assert result["config"]["top_k"] == 32  # the tiny model's whole vocabulary, not 250


def test_report_uses_committed_results_only(tmp_path):
    """A smoke run's JSON (untracked) or an uncommitted re-run never reaches the README table."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import report

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (results / "bench-cpu-small.json").write_text(json.dumps({"run": "committed"}))
    git("add", ".")
    git("commit", "-q", "-m", "result")
    (results / "bench-cpu-tiny.json").write_text(json.dumps({"run": "smoke"}))
    found, uncommitted = report.committed_results(str(tmp_path))
    assert found == [{"run": "committed"}] and uncommitted == ["benchmarks/results/bench-cpu-tiny.json"]
    (results / "bench-cpu-small.json").write_text(json.dumps({"run": "rerun"}))
    found, uncommitted = report.committed_results(str(tmp_path))
    assert found == [{"run": "committed"}]
    assert uncommitted == ["benchmarks/results/bench-cpu-small.json", "benchmarks/results/bench-cpu-tiny.json"]
