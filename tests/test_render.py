"""enginepy render: files equal `enginepy generate` per job; resumable after SIGKILL, damage and changed settings;
bad job lines reported by line; output directory refusals; the Ray Data path equals the single-process run."""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from enginepy.cli import main as cli_main
from enginepy.convert import convert_hf
from enginepy.render import main

# Mixed durations (3..10 frames) and settings; "2" gets its id from its line and its seed from --seed + 1.
JOBS = [
    {"id": "a", "prompt": "slow ambient strings", "duration": 0.2, "seed": 7},
    {"prompt": "fast drums", "duration": 0.06, "top_k": 5},
    {"id": "c", "prompt": "warm piano with soft bass", "duration": 0.14, "use_sampling": False, "cfg_coef": 1.0},
    {"id": "d", "prompt": "jazz", "duration": 0.1, "top_p": 0.8, "temperature": 0.7, "seed": 12},
    {"id": "e", "prompt": "rock guitar", "duration": 0.18, "cfg_coef": 5.5, "seed": 3},
    {"id": "f.long-name_1", "prompt": "calm night rain", "duration": 0.08, "top_k": 0, "seed": 2**62},
]
BASE_SEED = 100
FILES = ["a.wav", "2.wav", "c.wav", "d.wav", "e.wav", "f.long-name_1.wav"]


def _write_jsonl(path, jobs) -> str:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return str(path)


def _render(model_dir, jobs_path, out, *extra) -> int:
    return main([str(jobs_path), "--out", str(out), "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                 "--seed", str(BASE_SEED), "--max-batch", "2", "--quiet", *extra])


def _generate_args(job: dict, line: int) -> list[str]:
    """The `enginepy generate` flags that ask for the same audio as a job line."""
    args = ["--duration", str(job["duration"]), "--seed", str(job.get("seed", BASE_SEED + line - 1))]
    if job.get("use_sampling") is False:
        args.append("--greedy")
    for key in ("top_k", "top_p", "temperature", "cfg_coef"):
        if key in job:
            args += ["--" + key.replace("_", "-"), str(job[key])]
    return args


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _untimed(out) -> dict[str, bytes]:
    """Every file of a render directory, the manifest's measured compute_s values blanked: what must be
    byte-identical between any two complete runs of one job file."""
    files = {}
    for name in sorted(os.listdir(out)):
        data = (out / name).read_bytes()
        if name == "manifest.jsonl":
            data = re.sub(rb'"compute_s": [0-9.e+-]+', b'"compute_s": null', data)
        files[name] = data
    return files


@pytest.fixture(scope="module")
def model_dir(tiny_hf, tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("render-model") / "tiny")
    convert_hf(tiny_hf, dst, "float32")
    return dst


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One uninterrupted render of JOBS: (jobs file, output directory)."""
    root = tmp_path_factory.mktemp("render-reference")
    jobs = _write_jsonl(root / "jobs.jsonl", JOBS)
    assert _render(model_dir, jobs, root / "out") == 0
    return jobs, root / "out"


def test_each_file_equals_enginepy_generate_for_its_job(model_dir, reference, tmp_path):
    _, out = reference
    assert sorted(os.listdir(out)) == sorted(FILES + ["manifest.jsonl"])
    manifest = _manifest(out)
    assert [e["file"] for e in manifest] == FILES and [e["line"] for e in manifest] == [1, 2, 3, 4, 5, 6]
    for line, (job, entry) in enumerate(zip(JOBS, manifest), start=1):
        golden = tmp_path / f"golden-{line}.wav"
        assert cli_main(["generate", job["prompt"], "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                         *_generate_args(job, line), "--out", str(golden), "--quiet"]) == 0
        data = (out / entry["file"]).read_bytes()
        assert data == golden.read_bytes(), entry["id"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["status"] == "done" and entry["prompt"] == job["prompt"]
        assert entry["seed"] == job.get("seed", BASE_SEED + line - 1)
        assert entry["frames"] == int(job["duration"] * 50) and entry["dtype"] == "float32"
        assert entry["model"] == os.path.realpath(model_dir) and entry["compute_s"] > 0
    assert manifest[1]["settings"] == {"duration": 0.06, "use_sampling": True, "top_k": 5, "top_p": 0.0,
                                       "temperature": 1.0, "cfg_coef": 3.0}
    assert manifest[0]["settings"]["top_k"] == 32  # None -> min(250, V) with V = 32, as the engine resolves it
    assert len({(out / f).read_bytes() for f in FILES}) == len(FILES)


def test_text_and_csv_job_files_give_the_same_files_as_jsonl(model_dir, reference, tmp_path):
    prompts = ["slow ambient strings", "", "fast drums", "  jazz  "]
    text = tmp_path / "jobs.txt"
    text.write_text("\n".join(prompts) + "\n")
    assert _render(model_dir, text, tmp_path / "text", "--duration", "0.1") == 0
    # Line i (1-based) is named i and seeded --seed + i - 1; the blank line is no job but still counts.
    same = [{"id": str(i), "prompt": p.strip(), "duration": 0.1, "seed": BASE_SEED + i - 1}
            for i, p in enumerate(prompts, start=1) if p]
    assert _render(model_dir, _write_jsonl(tmp_path / "same.jsonl", same), tmp_path / "jsonl") == 0
    assert sorted(os.listdir(tmp_path / "text")) == ["1.wav", "3.wav", "4.wav", "manifest.jsonl"]
    for name in ("1.wav", "3.wav", "4.wav"):
        assert (tmp_path / "text" / name).read_bytes() == (tmp_path / "jsonl" / name).read_bytes()

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "prompt", "duration", "seed", "use_sampling", "top_k", "top_p", "temperature", "cfg_coef"])
    for line, job in enumerate(JOBS, start=2):
        # CSV records start at line 2 (the header is line 1): the id-less job gets its JSONL name and seed.
        job = {"id": "2", "seed": BASE_SEED + 1, **job} if "id" not in job else job
        writer.writerow([job["id"], job["prompt"], job["duration"], job.get("seed", ""),
                         {True: "true", False: "false"}.get(job.get("use_sampling"), ""), job.get("top_k", ""),
                         job.get("top_p", ""), job.get("temperature", ""), job.get("cfg_coef", "")])
    (tmp_path / "jobs.csv").write_text(buf.getvalue())
    assert _render(model_dir, tmp_path / "jobs.csv", tmp_path / "csv") == 0
    _, ref_out = reference
    for name in FILES:
        assert (tmp_path / "csv" / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_job_files_with_a_byte_order_mark_crlf_and_line_separators_in_prompts(tmp_path):
    from enginepy.render.jobs import JobDefaults, parse_jobs

    defaults = JobDefaults(duration=0.1, seed=5)
    (tmp_path / "jobs.csv").write_bytes("\ufeffid,prompt\r\nx,jazz\r\ny,\"two\r\nlines\"\r\nz,rock\r\n".encode())
    jobs, bad = parse_jobs(str(tmp_path / "jobs.csv"), defaults, 32, 50, 30.0)
    assert bad == [] and [(j.id, j.prompt, j.line, j.seed) for j in jobs] == [
        ("x", "jazz", 2, 6), ("y", "two\r\nlines", 3, 7), ("z", "rock", 5, 9)]
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a\u2028b"}\r\n\r\n{"prompt": "c", "id": 7}\n', encoding="utf-8")
    jobs, bad = parse_jobs(str(tmp_path / "jobs.jsonl"), defaults, 32, 50, 30.0)
    assert bad == [] and [(j.id, j.prompt, j.line) for j in jobs] == [("1", "a\u2028b", 1), ("7", "c", 3)]
    assert jobs[0].settings == {"duration": 0.1, "use_sampling": True, "top_k": 32, "top_p": 0.0,
                                "temperature": 1.0, "cfg_coef": 3.0} and jobs[0].frames == 5
    (tmp_path / "jobs.txt").write_text("  jazz\r\n\r\nrock \u2028 pop\n", encoding="utf-8")
    jobs, bad = parse_jobs(str(tmp_path / "jobs.txt"), defaults, 32, 50, 30.0)
    assert bad == [] and [(j.id, j.prompt, j.seed) for j in jobs] == [("1", "jazz", 5), ("3", "rock \u2028 pop", 7)]


def test_flac_files_equal_enginepy_generate(model_dir, tmp_path):
    job = JOBS[3]
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", [job])
    assert _render(model_dir, jobs, tmp_path / "out", "--format", "flac") == 0
    golden = tmp_path / "golden.flac"
    assert cli_main(["generate", job["prompt"], "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                     *_generate_args(job, 1), "--out", str(golden), "--quiet"]) == 0
    assert (tmp_path / "out" / "d.flac").read_bytes() == golden.read_bytes()
    assert _manifest(tmp_path / "out")[0]["file"] == "d.flac"


def test_int8_decoder_files_equal_enginepy_generate(model_dir, tmp_path):
    job = JOBS[0]
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", [job])
    assert main([jobs, "--out", str(tmp_path / "out"), "--model", model_dir, "--device", "cpu", "--dtype", "int8",
                 "--quiet"]) == 0
    golden = tmp_path / "golden.wav"
    assert cli_main(["generate", job["prompt"], "--model", model_dir, "--device", "cpu", "--dtype", "int8",
                     *_generate_args(job, 1), "--out", str(golden), "--quiet"]) == 0
    assert (tmp_path / "out" / "a.wav").read_bytes() == golden.read_bytes()
    assert _manifest(tmp_path / "out")[0]["dtype"] == "int8"


BAD_LINES = [
    ('{"id": "x1", "prompt": "jazz", "topk": 3}',
     "unknown key 'topk' (a job may give id, prompt, seed, duration, use_sampling, top_k, top_p, temperature, "
     "cfg_coef, cfg_coef_beta, two_step_cfg, melody, continue)"),
    ('{"id": "x2", "prompt": "jazz", "top_k": 999}', "top_k must be an integer in [0, 32]; got 999"),
    ('{"id": "x3", "prompt": "jazz", "duration": "8"}', "duration must be a finite number; got '8'"),
    ('{"id": "x4", "prompt": "jazz", "duration": 45}',
     "duration must be in (0, 30] seconds; got 45 (raise max_duration in from_pretrained for longer audio)"),
    ('{"id": "x5", "prompt": "jazz", "duration": 0.01}', "duration must be at least one frame (1/50 s); got 0.01"),
    ('{"id": "x6", "prompt": "jazz", "temperature": -1}', "temperature must be >= 0 (0 means greedy); got -1"),
    ('{"id": "x7", "prompt": "jazz", "cfg_coef": -2}', "cfg_coef must be >= 0; got -2"),
    ('{"id": "x8", "prompt": "jazz", "top_p": 1.5}', "top_p must be in [0, 1]; got 1.5"),
    ('{"id": "x9", "prompt": "jazz", "seed": -1}', "seed must be None or an integer in [0, 2**63 - 1]; got -1"),
    ('{"id": "x10", "prompt": "jazz", "seed": 1.5}', "seed must be None or an integer in [0, 2**63 - 1]; got 1.5"),
    ('{"id": "x11", "prompt": "jazz", "use_sampling": "yes"}', "use_sampling must be True or False; got 'yes'"),
    ('{"id": "x12"}', "prompt is missing"),
    ('{"id": "x13", "prompt": 5}', "prompt must be a string; got int"),
    ('{"id": "../x", "prompt": "jazz"}',
     "id must be a file name of letters, digits, '.', '_' and '-' that starts with a letter or digit "
     "(at most 128 characters); got '../x'"),
    ('{"id": ".hidden", "prompt": "jazz"}', "got '.hidden'"),
    ('{"id": "a/b", "prompt": "jazz"}', "got 'a/b'"),
    ('{"id": true, "prompt": "jazz"}', "got True"),
    ('{"id": "' + "n" * 129 + '", "prompt": "jazz"}', "at most 128 characters"),
    ('{"id": "ok", "prompt": "dup"}', "id 'ok' is already used by line 1"),
    ('{"id": "OK", "prompt": "dup"}', "id 'OK' is already used by line 1 ('ok': file names that differ only in case clash)"),
    ('{"id": "x14", "prompt": "jazz",', "not valid JSON (Expecting property name enclosed in double quotes at column 32)"),
    ('["jazz"]', "a job must be a JSON object; got list"),
]


def test_bad_job_lines_are_reported_by_line_and_the_rest_render(model_dir, tmp_path, capsys):
    lines = ['{"id": "ok", "prompt": "jazz", "duration": 0.1}'] + [line for line, _ in BAD_LINES]
    lines.append('{"id": "ok2", "prompt": "rock", "duration": 0.06}')
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    assert _render(model_dir, jobs, tmp_path / "out") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(BAD_LINES)
    for number, ((_, message), reported) in enumerate(zip(BAD_LINES, err), start=2):
        assert reported.startswith(f"{jobs}:{number}: ") and message in reported, reported
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.jsonl", "ok.wav", "ok2.wav"]
    manifest = _manifest(tmp_path / "out")
    assert [e["line"] for e in manifest] == list(range(1, len(lines) + 1))
    assert [e["status"] for e in manifest] == ["done"] + ["failed"] * len(BAD_LINES) + ["done"]
    assert manifest[1] == {"id": "x1", "line": 2, "status": "failed", "error": BAD_LINES[0][1]}
    # A rerun retries the failed lines (they fail again) and keeps the rendered files: the same directory.
    before = _untimed(tmp_path / "out")
    stamp = os.stat(tmp_path / "out" / "ok.wav").st_mtime_ns
    assert _render(model_dir, jobs, tmp_path / "out") == 1
    assert _untimed(tmp_path / "out") == before and os.stat(tmp_path / "out" / "ok.wav").st_mtime_ns == stamp
    assert "done 0 " in capsys.readouterr().out


def test_bad_csv_cells_and_a_prompt_the_engine_refuses(model_dir, tmp_path, capsys):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,duration,top_k,use_sampling,colour\n"
                    "jazz,0.1,,,\n"
                    "jazz,abc,,,\n"
                    "jazz,0.1,2.5,,\n"
                    "jazz,0.1,,maybe,\n"
                    "jazz,0.1,,,red\n"
                    "jazz,0.1,,,,extra\n"
                    '"a long prompt, with a comma",0.1,,,\n')
    assert _render(model_dir, jobs, tmp_path / "out", "--max-text-len", "3") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:5] == [
        f"{jobs}:3: duration must be a number; got 'abc'",
        f"{jobs}:4: top_k must be an integer; got '2.5'",
        f"{jobs}:5: use_sampling must be true or false; got 'maybe'",
        f"{jobs}:6: unknown key 'colour' (a job may give id, prompt, seed, duration, use_sampling, top_k, top_p, "
        "temperature, cfg_coef, cfg_coef_beta, two_step_cfg, melody, continue)",
        f"{jobs}:7: 6 cells but the header names 5 columns",
    ]
    # Known only when the engine admits the request (the tokenizer's count), reported the same way.
    assert err[5].startswith(f"{jobs}:8: ") and "3" in err[5] and "token" in err[5], err[5]
    assert sorted(os.listdir(tmp_path / "out")) == ["2.wav", "manifest.jsonl"]
    assert [e["status"] for e in _manifest(tmp_path / "out")] == ["done"] + ["failed"] * 6


def test_damaged_missing_and_changed_jobs_are_redone_and_nothing_else(model_dir, reference, tmp_path, capsys):
    ref_jobs, ref_out = reference
    out = tmp_path / "out"
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS)
    assert _render(model_dir, jobs, out) == 0
    data = bytearray((out / "a.wav").read_bytes())
    data[60] ^= 0x01  # one flipped bit in the samples
    (out / "a.wav").write_bytes(bytes(data))
    (out / "2.wav").write_bytes((out / "2.wav").read_bytes()[:50])  # truncated
    (out / "c.wav").unlink()
    manifest = _manifest(out)
    lines = [json.dumps(e) for e in manifest if e["id"] != "d"]  # d.wav exists but its manifest line is gone
    (out / "manifest.jsonl").write_text("\n".join(lines) + '\n{"id": "e", "status": "do')  # and a torn last line
    (out / ".enginepy-abc123.wav").write_bytes(b"RIFF")  # a temporary file a killed write left
    untouched = os.stat(out / "e.wav")
    assert _render(model_dir, jobs, out) == 0
    assert "done 4 " in capsys.readouterr().out
    assert _untimed(out) == _untimed(ref_out)
    assert os.stat(out / "e.wav").st_mtime_ns == untouched.st_mtime_ns

    # A changed setting re-renders that job only; the directory then equals a fresh run of the new file.
    changed = [dict(job) for job in JOBS]
    changed[4]["cfg_coef"] = 2.0
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", changed)
    assert _render(model_dir, jobs, out) == 0
    assert "done 1 " in capsys.readouterr().out
    assert _render(model_dir, jobs, tmp_path / "fresh") == 0
    assert _untimed(out) == _untimed(tmp_path / "fresh") != _untimed(ref_out)
    # A different dtype or format is a different output: every job is redone.
    assert _render(model_dir, jobs, out, "--dtype", "bfloat16") == 0
    assert "done 6 " in capsys.readouterr().out


def test_a_write_that_fails_mid_run_is_one_line_and_the_rerun_resumes(model_dir, reference, tmp_path, capsys,
                                                                       monkeypatch):
    import errno

    from enginepy.render import worker

    ref_jobs, ref_out = reference
    out = tmp_path / "out"
    real, calls = worker.write_audio, []

    def disk_full_at_the_third(path, wav, rate):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, wav, rate)

    monkeypatch.setattr(worker, "write_audio", disk_full_at_the_third)
    assert _render(model_dir, ref_jobs, out) == 2
    assert capsys.readouterr().err == (f"enginepy: error: cannot write {calls[2]} (No space left on device); the jobs "
                                       "finished so far are recorded: run the same command again to resume\n")
    assert len(_manifest(out)) == 2
    monkeypatch.setattr(worker, "write_audio", real)
    assert _render(model_dir, ref_jobs, out) == 0
    assert "done 4 (" in capsys.readouterr().out
    assert _untimed(out) == _untimed(ref_out)


# Runs render in a child process that SIGKILLs itself at the 3rd audio file: before its rename (a temporary
# file is left behind) or after it (a finished file without its manifest line).
KILLER = """
import os, signal, sys
where, argv = sys.argv[1], sys.argv[2:]
real_replace, count = os.replace, [0]
def replace(src, dst, *a, **k):
    if str(dst).endswith(".wav"):
        count[0] += 1
        if count[0] == 3 and where == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *a, **k)
    if str(dst).endswith(".wav") and count[0] == 3 and where == "after-rename":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from enginepy.render import main
sys.exit(main(argv))
"""


@pytest.mark.parametrize("where", ["before-rename", "after-rename"])
def test_sigkill_mid_run_then_rerun_renders_exactly_the_missing_jobs(model_dir, reference, tmp_path, capsys, where):
    ref_jobs, ref_out = reference
    out = tmp_path / "out"
    argv = [ref_jobs, "--out", str(out), "--model", model_dir, "--device", "cpu", "--dtype", "float32",
            "--seed", str(BASE_SEED), "--max-batch", "2", "--quiet"]
    r = subprocess.run([sys.executable, "-c", KILLER, where, *argv], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = os.listdir(out)
    assert len(_manifest(out)) == 2  # two jobs journaled; the third was being written
    assert sum(n.startswith(".enginepy-") for n in left) == (where == "before-rename")
    assert sum(n.endswith(".wav") and not n.startswith(".") for n in left) == (2 if where == "before-rename" else 3)
    kept = {e["file"]: os.stat(out / e["file"]).st_mtime_ns for e in _manifest(out)}
    capsys.readouterr()
    assert _render(model_dir, ref_jobs, out) == 0
    summary = capsys.readouterr().out
    assert "done 4 (" in summary and "skipped 2 already rendered" in summary
    assert _untimed(out) == _untimed(ref_out)
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "mp3"], "--format must be one of wav, flac; got 'mp3'"),
        (["--max-batch", "0"], "--max-batch must be a positive integer; got 0"),
        (["--actors", "2"], "--actors and --actor-cpus apply to --ray only"),
        (["--actors", "0", "--ray"], "--actors must be a positive integer; got 0"),
        (["--duration", "0"], "--duration must be in (0, 30] seconds; got 0.0"),
        (["--max-duration", "-1"], "--max-duration must be a positive number of seconds; got -1.0"),
        (["--max-text-len", "600"], "--max-text-len must be an integer in [1, 512]; got 600"),
        (["--top-k", "-1"], "top_k must be an integer in [0, vocabulary size]; got -1"),
        (["--top-p", "2"], "top_p must be in [0, 1]; got 2.0"),
        (["--temperature", "-1"], "temperature must be >= 0 (0 means greedy); got -1.0"),
        (["--cfg-coef", "-1"], "cfg_coef must be >= 0; got -1.0"),
        (["--seed", "-3"], "seed must be None or an integer in [0, 2**63 - 1]; got -3"),
        (["--backend", "warp"], "--backend must be one of reference, fast; got 'warp'"),
        (["--dtype", "fp8"], "--dtype must be one of float32, float16, bfloat16, int8; got 'fp8'"),
        (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
        (["--device", "cuda:1", "--ray"], "--device with --ray must be 'cpu' or 'cuda' (Ray gives each actor its "
                                          "GPU); got 'cuda:1'"),
    ],
)
def test_options_are_refused_in_one_line_before_any_work(tmp_path, capsys, args, message):
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS[:1])
    code = main([jobs, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err == f"enginepy: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_enginepy_render_on_the_main_command_line(model_dir, reference, tmp_path, capsys):
    ref_jobs, ref_out = reference
    assert cli_main(["render", ref_jobs, "--out", str(tmp_path / "o"), "--format", "mp3"]) == 2
    assert capsys.readouterr().err == "enginepy: error: --format must be one of wav, flac; got 'mp3'\n"
    argv = [ref_jobs, "--out", str(tmp_path / "out"), "--model", model_dir, "--device", "cpu", "--dtype", "float32",
            "--seed", str(BASE_SEED), "--max-batch", "3", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "enginepy", "render", *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _untimed(tmp_path / "out") == _untimed(ref_out)


def test_job_file_and_output_directory_refusals(tmp_path, capsys):
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS[:1])
    (tmp_path / "a_file").write_text("x")
    no_model = str(tmp_path / "no-model")  # every refusal comes before the model is looked for
    cases = [
        ([str(tmp_path / "jobs.json"), "--out", str(tmp_path / "o")],
         f"JOBS must end in .jsonl, .csv, .txt (the extension picks the format); got '{tmp_path / 'jobs.json'}'"),
        ([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")], f"JOBS {tmp_path / 'missing.jsonl'} does not exist"),
        ([jobs, "--out", "/proc/render"], "--out /proc/render: cannot create files in /proc"),
        ([jobs, "--out", str(tmp_path / "a_file")], f"--out {tmp_path / 'a_file'} exists and is not a directory"),
        ([jobs, "--out", str(tmp_path / "a_file" / "sub")],
         f"--out {tmp_path / 'a_file' / 'sub'}: {tmp_path / 'a_file'} is a file, not a directory"),
    ]
    for argv, message in cases:
        assert main([*argv, "--model", no_model]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"enginepy: error: {message}") and err.count("\n") == 1, err
    assert main([jobs]) == 2
    assert capsys.readouterr().err.startswith("enginepy render: error: the following arguments are required: --out")


def test_empty_and_undecodable_job_files_are_refused(model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 jazz\n".encode("latin-1"))
    assert main([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), "--model", model_dir]) == 2
    assert capsys.readouterr().err == f"enginepy: error: JOBS {tmp_path / 'empty.txt'} holds no jobs\n"
    assert main([str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "o"), "--model", model_dir]) == 2
    assert capsys.readouterr().err == (f"enginepy: error: JOBS {tmp_path / 'latin1.txt'} is not UTF-8 text "
                                       "(byte 3: invalid continuation byte)\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_one_line(tmp_path, capsys):
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS[:1])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert main([jobs, "--out", str(ro / "renders"), "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err == f"enginepy: error: --out {ro / 'renders'}: cannot create files in {ro} (Permission denied)\n"


def test_a_directory_being_rendered_is_refused(model_dir, tmp_path, capsys):
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS[:1])
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a render running in another process holds
        assert _render(model_dir, jobs, tmp_path / "out") == 2
    finally:
        os.close(fd)
    assert capsys.readouterr().err == (f"enginepy: error: --out {tmp_path / 'out'} is being rendered by another "
                                       "process; wait for it or use another directory\n")
    assert os.listdir(tmp_path / "out") == []


def test_progress_bar_counts_jobs_on_a_terminal(model_dir, tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    jobs = _write_jsonl(tmp_path / "jobs.jsonl", JOBS[:3])
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main([jobs, "--out", str(tmp_path / "out"), "--model", model_dir, "--device", "cpu"]) == 0
    assert "rendering" in term.getvalue() and "/3 " in term.getvalue() and "audio-s" in term.getvalue()
    summary = capsys.readouterr().out.splitlines()[-1]
    assert re.match(r"done 3 \(0\.40 audio-s in [0-9.]+ s = [0-9.]+ audio-s/s\), skipped 0 already rendered, "
                    r"failed 0 \| .*manifest\.jsonl$", summary), summary


@pytest.mark.triton
def test_fast_backend_renders_the_same_files(model_dir, reference, tmp_path):
    """fp32 codes of the fast backend equal the reference backend's: so do the files (its own engine is reused)."""
    _, ref_out = reference
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", [JOBS[0], JOBS[2]])  # two jobs: the interpreter is slow
    assert _render(model_dir, jobs, tmp_path / "out", "--backend", "fast") == 0
    for name in ("a.wav", "c.wav"):
        assert (tmp_path / "out" / name).read_bytes() == (ref_out / name).read_bytes()


def test_ray_actor_pool_equals_the_single_process_run(model_dir, reference, tmp_path, capsys, monkeypatch):
    ray = pytest.importorskip("ray")
    ref_jobs, ref_out = reference
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    # Relative paths: Ray's workers run elsewhere, so the command must hand them absolute ones.
    monkeypatch.chdir(os.path.dirname(model_dir))
    try:
        assert _render(os.path.basename(model_dir), ref_jobs, os.path.relpath(out), "--actors", "2", "--ray") == 0
        assert _untimed(out) == _untimed(ref_out)
        # Resuming on Ray redoes only what is damaged.
        (out / "c.wav").write_bytes(b"RIFF")
        capsys.readouterr()
        assert _render(model_dir, ref_jobs, out, "--actors", "2", "--ray") == 0
        assert "done 1 " in capsys.readouterr().out
        assert _untimed(out) == _untimed(ref_out)
    finally:
        ray.shutdown()
