"""Audio inputs over HTTP and in bulk rendering: a melody (MusicGen-Melody models) and an audio prompt to continue.

Oracle: the offline API on the same audio, seed and settings — `MusicGen.generate_with_chroma` for a melody,
`MusicGen.generate_continuation` for an audio prompt (itself checked against transformers in test_melody.py and
test_variants.py). A non-streamed server response must be the very bytes `write_audio` writes for the API's
waveform (so the same decoded samples); a rendered file likewise. Servers are real `python -m enginepy.serve`
processes (the harness of test_serve.py) on the tiny random models, reference backend, fp32.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import httpx
import numpy as np
import pytest
import soundfile as sf

from enginepy import MusicGen
from enginepy.audio_io import write_audio
from enginepy.audio_prompt import read_audio
from enginepy.convert import convert_hf
from enginepy.render import main as render_main
from test_serve import GEN, TIMEOUT, Server, assert_close_to, file_bytes

TEXT_FILE = "an audio file (WAV, FLAC or Ogg)"


# -- audio ------------------------------------------------------------------------------------------------------
def tone(seconds: float, rate: int, freq: float, channels: int = 1) -> np.ndarray:
    """Two notes (freq, then a fifth above), float32 [T, C] at `rate` Hz."""
    t = np.arange(int(round(seconds * rate))) / rate
    f = np.where(t < seconds / 2, freq, freq * 1.5)
    wave = (0.4 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def audio_file(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def as_read(data: bytes, path) -> tuple:
    """The (float32 [C, T], rate) that `enginepy generate --melody / --continue` would read from these bytes."""
    path.write_bytes(data)
    return read_audio(str(path), "audio")


MELODY = audio_file(tone(0.5, 16000, 440.0), 16000, "FLAC")           # 16 kHz FLAC: resampled for the chroma
OTHER_MELODY = audio_file(tone(0.5, 16000, 311.1), 16000, "FLAC")
PROMPT = audio_file(tone(0.1, 8000, 220.0, channels=2), 8000)          # stereo 8 kHz: mixed and resampled to 800


# -- models and servers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def melody_mg(model_factory, engine_cache):
    return MusicGen.from_pretrained(model_factory("melody-short"), device="cpu", dtype="float32",
                                    backend="reference", cache_dir=engine_cache)


@pytest.fixture(scope="module")
def text_mg(tiny_hf, engine_cache):
    # Its own copy: these tests change its generation settings (two_step_cfg, cfg_coef_beta).
    return MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", backend="reference",
                                    cache_dir=engine_cache)


def _serve(model: str, engine_cache: str, log) -> Server:
    return Server(["-m", "enginepy.serve", "--model", model, "--device", "cpu", "--backend", "reference",
                   "--dtype", "float32", "--max-batch", "2", "--port", "0", "--log-level", "warning",
                   "--max-body-bytes", "65536"],
                  log, {"ENGINEPY_CACHE": engine_cache, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def melody_server(model_factory, engine_cache, tmp_path_factory):
    s = _serve(model_factory("melody-short"), engine_cache, tmp_path_factory.mktemp("serve-melody") / "server.log")
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()


@pytest.fixture(scope="module")
def text_server(tiny_hf, engine_cache, tmp_path_factory):
    s = _serve(tiny_hf, engine_cache, tmp_path_factory.mktemp("serve-text") / "server.log")
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()


def post(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url + GEN, json=body, timeout=TIMEOUT)


# -- server -----------------------------------------------------------------------------------------------------
def test_server_melody_equals_generate_with_chroma(melody_server, melody_mg, tmp_path):
    audio, rate = as_read(MELODY, tmp_path / "melody.flac")
    bodies = []
    for i, settings in enumerate([{}, dict(cfg_coef_beta=0.5, top_k=4)]):
        r = post(melody_server, prompt="warm piano", duration=0.2, seed=5, melody=b64(MELODY), **settings)
        assert r.status_code == 200, r.text
        melody_mg.set_generation_params(duration=0.2, seed=5, **settings)
        wav = melody_mg.generate_with_chroma(["warm piano"], [audio], rate)[0]
        # The very bytes `write_audio` writes for the API's waveform: the same decoded samples.
        assert r.content == file_bytes(wav, melody_mg.sample_rate, tmp_path / f"expected-{i}.wav")
        bodies.append(r.content)
    # The melody is heard: without it (or with another one) the same seed gives other music.
    plain = post(melody_server, prompt="warm piano", duration=0.2, seed=5)
    other = post(melody_server, prompt="warm piano", duration=0.2, seed=5, melody=b64(OTHER_MELODY))
    assert len({plain.content, other.content, bodies[0]}) == 3
    # Streamed: the streaming decoder's pieces, within its tolerance of the one-shot audio.
    melody_mg.set_generation_params(duration=0.2, seed=6)
    wav = melody_mg.generate_with_chroma(["jazz"], [audio], rate)[0]
    r = post(melody_server, prompt="jazz", duration=0.2, seed=6, melody=b64(MELODY), stream=True,
             response_format="pcm")
    assert r.status_code == 200, r.text
    assert_close_to(np.frombuffer(r.content, "<i2").reshape(-1, melody_mg.audio_channels), wav)


def test_server_continuation_equals_generate_continuation(text_server, text_mg, melody_server, melody_mg, tmp_path):
    prompt, prompt_rate = as_read(PROMPT, tmp_path / "prompt.wav")
    for i, settings in enumerate([{}, dict(two_step_cfg=True, cfg_coef=2.0), dict(cfg_coef_beta=2.0)]):
        r = post(text_server, prompt="jazz", duration=0.3, seed=3, audio_prompt=b64(PROMPT), **settings)
        assert r.status_code == 200, r.text
        text_mg.set_generation_params(duration=0.3, seed=3, **settings)
        wav = text_mg.generate_continuation(prompt, prompt_rate, ["jazz"])
        assert r.content == file_bytes(wav[0], text_mg.sample_rate, tmp_path / f"expected-{i}.wav")
    # A melody model continues under a melody: both inputs in one request.
    melody, melody_rate = as_read(MELODY, tmp_path / "melody.flac")
    r = post(melody_server, prompt="rock", duration=0.3, seed=4, audio_prompt=b64(PROMPT), melody=b64(MELODY))
    assert r.status_code == 200, r.text
    melody_mg.set_generation_params(duration=0.3, seed=4)
    wav = melody_mg.generate_continuation(prompt, prompt_rate, ["rock"], melody_wavs=[melody],
                                          melody_sample_rate=melody_rate)
    assert r.content == file_bytes(wav[0], melody_mg.sample_rate, tmp_path / "expected-both.wav")


def _nan_wav() -> bytes:
    samples = tone(0.1, 8000, 220.0)
    samples[10] = np.nan
    return audio_file(samples, 8000, subtype="FLOAT")


# (server, extra body, param, message; "..." at the end: the message starts so)
BAD_AUDIO = [
    ("melody", dict(melody=123), "melody", f"melody must be a string: base64 of {TEXT_FILE}; got int"),
    ("melody", dict(melody="not base64!"), "melody", f"melody must be base64 of {TEXT_FILE}: ..."),
    ("melody", dict(melody=""), "melody", f"melody is empty: give base64 of {TEXT_FILE}"),
    ("melody", dict(melody=b64(b"RIFF0000WAVEjunk")), "melody", "melody cannot be read as audio (..."),
    ("melody", dict(melody=b64(audio_file(np.zeros((0, 1), np.float32), 16000))), "melody",
     "melody holds no audio samples"),
    ("melody", dict(melody=b64(_nan_wav())), "melody", "melody has NaN or infinite samples"),
    ("melody", dict(melody=b64(audio_file(tone(0.5, 50, 5.0), 50))), "melody",
     "melody sample rate must be an integer number of Hz in [100, 768000]; got 50"),
    ("melody", dict(two_step_cfg="yes"), "two_step_cfg", "two_step_cfg must be True or False; got 'yes'"),
    ("melody", dict(cfg_coef_beta=-1), "cfg_coef_beta", "cfg_coef_beta must be >= 0; got -1"),
    ("text", dict(melody=b64(MELODY)), "melody",
     "melody needs a MusicGen-Melody model (this one is conditioned on text only)"),
    ("text", dict(audio_prompt="aGVsbG8"), "audio_prompt", f"audio_prompt must be base64 of {TEXT_FILE}: ..."),
    ("text", dict(audio_prompt="é"), "audio_prompt", f"audio_prompt must be base64 of {TEXT_FILE}: ..."),
    ("text", dict(audio_prompt=b64(b"fLaC\x00\x00")), "audio_prompt", "audio_prompt cannot be read as audio (..."),
    ("text", dict(audio_prompt=b64(_nan_wav())), "audio_prompt", "audio_prompt has NaN or infinite samples"),
    ("text", dict(audio_prompt=b64(audio_file(tone(1.0, 10**6 + 1, 440.0)[:100], 10**6 + 1))), "audio_prompt",
     "audio_prompt sample rate must be an integer number of Hz in [100, 768000]; got 1000001"),
    # As long as the duration (10 frames): nothing would be left to generate.
    ("text", dict(audio_prompt=b64(audio_file(tone(0.2, 800, 100.0), 800))), "audio_prompt",
     "audio_prompt lasts 0.2 s (10 frames); it must be shorter than duration (0.2 s, 10 frames), which includes it"),
    ("text", dict(audio_prompt=b64(audio_file(tone(0.5, 8000, 100.0), 8000))), "audio_prompt",
     "audio_prompt lasts 0.5 s (25 frames); it must be shorter than duration (0.2 s, 10 frames), which includes it"),
]


def test_bad_audio_gets_400_naming_the_field_and_the_server_keeps_serving(melody_server, text_server):
    servers = {"melody": melody_server, "text": text_server}
    for name, extra, param, message in BAD_AUDIO:
        r = post(servers[name], prompt="jazz", duration=0.2, seed=1, **extra)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (extra, error)
        if message.endswith("..."):
            assert error["message"].startswith(message[:-3]) and len(error["message"]) > len(message) - 3, error
            assert "0x" not in error["message"], error  # no object addresses from the decoder
        else:
            assert error["message"] == message, error
    for server in servers.values():
        assert post(server, prompt="jazz", duration=0.1, seed=1).status_code == 200
    # The body limit holds with audio inside, and the schema says the audio counts toward it.
    r = post(text_server, prompt="jazz", audio_prompt=b64(b"\x00" * 70000))
    assert r.status_code == 413 and r.json()["error"]["message"] == "request body must be at most 65536 bytes"
    spec = httpx.get(text_server.url + "/openapi.json", timeout=TIMEOUT).json()
    fields = spec["paths"][GEN]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for name in ("melody", "audio_prompt"):
        assert "request body limit" in fields[name]["description"]
    assert {"cfg_coef_beta", "two_step_cfg"} <= set(fields)


# -- render -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def render_models(model_factory, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("render-models")
    dirs = {"melody": str(root / "melody"), "text": str(root / "text")}
    convert_hf(model_factory("melody-short"), dirs["melody"], "float32")
    convert_hf(model_factory("base"), dirs["text"], "float32")
    return dirs


@pytest.fixture(scope="module")
def render_mg(render_models) -> dict[str, MusicGen]:
    return {name: MusicGen.from_pretrained(path, device="cpu", dtype="float32", backend="reference")
            for name, path in render_models.items()}


def _render(model_dir: str, jobs, out) -> int:
    return render_main([str(jobs), "--out", str(out), "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                        "--backend", "reference", "--max-batch", "2", "--quiet"])


def _write_jobs(path, jobs: list) -> None:
    path.write_text("".join((job if isinstance(job, str) else json.dumps(job)) + "\n" for job in jobs))


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _expected(mg: MusicGen, job: dict, base, path) -> bytes:
    """The file `enginepy generate` writes for a job: the API's waveform for its audio inputs, via write_audio."""
    mg.set_generation_params(duration=job["duration"], seed=job["seed"], cfg_coef=job.get("cfg_coef", 3.0),
                             cfg_coef_beta=job.get("cfg_coef_beta"), two_step_cfg=job.get("two_step_cfg", False))
    melody = {}
    if "melody" in job:
        audio, rate = read_audio(str(base / job["melody"]), "melody")
        melody = dict(melody_wavs=[audio], melody_sample_rate=rate)
    if "continue" in job:
        audio, rate = read_audio(str(base / job["continue"]), "continue")
        wav = mg.generate_continuation(audio, rate, [job["prompt"]], **melody)
    elif melody:
        wav = mg.generate_with_chroma([job["prompt"]], **melody)
    else:
        wav = mg.generate([job["prompt"]])
    write_audio(str(path), wav[0], mg.sample_rate)
    return path.read_bytes()


MELODY_JOBS = [
    {"id": "m1", "prompt": "warm piano", "duration": 0.2, "seed": 1, "melody": "audio/melody.flac"},
    {"id": "m2", "prompt": "jazz", "duration": 0.3, "seed": 2, "melody": "audio/melody.flac",
     "continue": "audio/prompt.wav", "cfg_coef_beta": 1.5},
    {"id": "c1", "prompt": "rock", "duration": 0.24, "seed": 3, "continue": "audio/prompt.wav"},
]


@pytest.fixture
def job_dir(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "melody.flac").write_bytes(MELODY)
    (tmp_path / "audio" / "prompt.wav").write_bytes(PROMPT)
    (tmp_path / "audio" / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    return tmp_path


def test_render_melody_and_continue_jobs_equal_the_api_and_bad_audio_lines_fail_alone(render_models, render_mg,
                                                                                       job_dir, capsys):
    audio = job_dir / "audio"
    lines = MELODY_JOBS + [
        {"id": "b1", "prompt": "x", "duration": 0.2, "melody": "audio/missing.wav"},
        {"id": "b2", "prompt": "x", "duration": 0.2, "melody": "audio/junk.wav"},
        {"id": "b3", "prompt": "x", "duration": 0.1, "continue": "audio/prompt.wav"},
        {"id": "b4", "prompt": "x", "duration": 0.2, "melody": 5},
        {"id": "b5", "prompt": "x", "duration": 0.2, "continue": "audio"},
        {"id": "b6", "prompt": "x", "duration": 0.2, "melody": "audio/melody.flac", "topk": 1},
    ]
    jobs = job_dir / "jobs.jsonl"
    _write_jobs(jobs, lines)
    assert _render(render_models["melody"], jobs, job_dir / "out") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[0] == f"{jobs}:4: melody {audio / 'missing.wav'} does not exist"
    assert err[1].startswith(f"{jobs}:5: melody {audio / 'junk.wav'} cannot be read as audio (")
    assert err[2:] == [
        f"{jobs}:6: continue {audio / 'prompt.wav'} lasts 0.1 s; it must be shorter than duration (0.1 s), "
        "which includes it",
        f"{jobs}:7: melody must be the path of an audio file (WAV, FLAC, Ogg); got 5",
        f"{jobs}:8: continue {audio} is not a file",
        f"{jobs}:9: unknown key 'topk' (a job may give id, prompt, seed, duration, use_sampling, top_k, top_p, "
        "temperature, cfg_coef, cfg_coef_beta, two_step_cfg, melody, continue)",
    ]
    out = job_dir / "out"
    assert sorted(os.listdir(out)) == ["c1.wav", "m1.wav", "m2.wav", "manifest.jsonl"]
    manifest = _manifest(out)
    assert [e["status"] for e in manifest] == ["done"] * 3 + ["failed"] * 6
    mg = render_mg["melody"]
    for job, entry in zip(MELODY_JOBS, manifest):
        assert (out / entry["file"]).read_bytes() == _expected(mg, job, job_dir, job_dir / "golden.wav"), job["id"]
        for kind in ("melody", "continue"):
            if kind in job:
                path = job_dir / job[kind]
                assert entry[kind] == {"path": str(path), "sha256": _sha256(path)}
            else:
                assert kind not in entry
    assert manifest[1]["settings"]["cfg_coef_beta"] == 1.5 and "cfg_coef_beta" not in manifest[0]["settings"]
    # Without its melody a job renders other music: the melody is heard.
    no_melody = {k: v for k, v in MELODY_JOBS[0].items() if k != "melody"}
    assert (out / "m1.wav").read_bytes() != _expected(mg, no_melody, job_dir, job_dir / "plain.wav")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_render_on_a_text_model_continues_and_refuses_melodies(render_models, render_mg, job_dir, capsys):
    t1 = {"id": "t1", "prompt": "jazz", "duration": 0.3, "seed": 9, "continue": "audio/prompt.wav",
          "two_step_cfg": True, "cfg_coef": 2.0}
    # CSV with the same columns: paths resolved against the job file's directory, booleans and numbers as cells.
    jobs = job_dir / "jobs.csv"
    jobs.write_text("id,prompt,duration,seed,continue,two_step_cfg,cfg_coef,melody\n"
                    "t1,jazz,0.3,9,audio/prompt.wav,true,2.0,\n"
                    "t2,jazz,0.2,9,,,,audio/melody.flac\n")
    assert _render(render_models["text"], jobs, job_dir / "out") == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{jobs}:3: melody needs a MusicGen-Melody model (this one is conditioned on text only)"]
    manifest = _manifest(job_dir / "out")
    assert [e["status"] for e in manifest] == ["done", "failed"] and manifest[0]["settings"]["two_step_cfg"] is True
    want = _expected(render_mg["text"], t1, job_dir, job_dir / "golden.wav")
    assert (job_dir / "out" / "t1.wav").read_bytes() == want


def test_resume_rerenders_jobs_whose_audio_changed_and_skips_the_rest(render_models, render_mg, job_dir, capsys):
    jobs = job_dir / "jobs.jsonl"
    _write_jobs(jobs, MELODY_JOBS)
    out = job_dir / "out"
    assert _render(render_models["melody"], jobs, out) == 0
    capsys.readouterr()
    stamps = {name: os.stat(out / name).st_mtime_ns for name in ("m1.wav", "m2.wav", "c1.wav")}
    before = (out / "manifest.jsonl").read_bytes()
    # Nothing changed: nothing is rendered, nothing is rewritten.
    assert _render(render_models["melody"], jobs, out) == 0
    assert "done 0 " in capsys.readouterr().out
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps
    # The same content at another path is the same input: still nothing to render.
    (job_dir / "audio" / "moved.flac").write_bytes(MELODY)
    moved = [dict(job, melody="audio/moved.flac") if "melody" in job else job for job in MELODY_JOBS]
    _write_jobs(jobs, moved)
    assert _render(render_models["melody"], jobs, out) == 0
    assert "done 0 " in capsys.readouterr().out
    assert _manifest(out)[0]["melody"]["path"] == str(job_dir / "audio" / "moved.flac")
    # New melody content under the same name: the two jobs that use it are rendered again, the other is kept.
    (job_dir / "audio" / "moved.flac").write_bytes(OTHER_MELODY)
    assert _render(render_models["melody"], jobs, out) == 0
    assert "done 2 " in capsys.readouterr().out
    assert os.stat(out / "c1.wav").st_mtime_ns == stamps["c1.wav"]
    manifest = _manifest(out)
    assert manifest[0]["melody"]["sha256"] == _sha256(job_dir / "audio" / "moved.flac") != json.loads(
        before.splitlines()[0])["melody"]["sha256"]
    mg = render_mg["melody"]
    for job, entry in zip(moved[:2], manifest):
        assert (out / entry["file"]).read_bytes() == _expected(mg, job, job_dir, job_dir / "golden.wav")


def test_ray_actor_renders_audio_jobs_like_the_local_renderer(render_models, render_mg, job_dir):
    """The Ray actor (called here without Ray) gets jobs as JSON, reads their audio where it runs, and writes the
    same files; a file changed after the job file was read fails its job instead of rendering other audio."""
    from enginepy.render.jobs import Job, JobDefaults, parse_jobs
    from enginepy.render.outdir import OutputKey
    from enginepy.render.ray_pool import RenderActor

    jobs_path = job_dir / "jobs.jsonl"
    _write_jobs(jobs_path, MELODY_JOBS)
    mg = render_mg["melody"]
    jobs, bad = parse_jobs(str(jobs_path), JobDefaults(), mg.cfg.vocab_size, mg.frame_rate, 30.0, melody_model=True)
    assert bad == [] and [Job.from_json(job.to_json()) for job in jobs] == jobs
    out = job_dir / "out"
    out.mkdir()
    key = OutputKey(render_models["melody"], "float32", "wav")
    actor = RenderActor(model=render_models["melody"], device="cpu", dtype="float32", backend="reference",
                        max_duration=30.0, max_text_len=256, max_batch=2, out_dir=str(out), key=key, threads=None)
    entries = [json.loads(e) for e in actor({"job": np.array([job.to_json() for job in jobs], dtype=object)})["entry"]]
    assert sorted(e["id"] for e in entries if e["status"] == "done") == ["c1", "m1", "m2"]
    for job in MELODY_JOBS:
        assert (out / f"{job['id']}.wav").read_bytes() == _expected(mg, job, job_dir, job_dir / "golden.wav")
    (job_dir / "audio" / "prompt.wav").write_bytes(audio_file(tone(0.1, 8000, 330.0), 8000))
    entries = [json.loads(e) for e in actor({"job": np.array([jobs[2].to_json()], dtype=object)})["entry"]]
    changed = f"continue {job_dir / 'audio' / 'prompt.wav'} changed after the job file was read; run the command again"
    assert entries == [{"id": "c1", "line": 3, "status": "failed", "error": changed}]
