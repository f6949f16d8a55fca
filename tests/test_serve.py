"""`enginepy serve` end to end: real server processes on localhost, a real HTTP client, a tiny random model on CPU.

Each response's audio is checked against the offline API for its seed and settings (non-streamed: the very
bytes `write_audio` writes for `MusicGen.generate`'s waveform, i.e. `enginepy generate`'s file; streamed: within
the streaming decoder's 1e-4 before 16-bit rounding). State after disconnects, failures and the soak is read
from /metrics, the server's own account of its slots and queues.

Two servers: `python -m enginepy.serve` (max batch 4), and one started by this file's __main__ whose runner
raises whenever a prompt containing FAIL_WORD is running (max batch 2, max waiting 1: queue overflow and engine
failures). Every wait below has a deadline.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from enginepy import InvalidParameter
from enginepy.audio_io import write_audio
from enginepy.serve.metrics import parse_samples

FAIL_WORD = "explode"
MAX_BATCH = 4
MAX_WAITING = 32
MAX_DURATION = 30.0
START_TIMEOUT_S = 120
TIMEOUT = httpx.Timeout(60.0)
GEN = "/v1/audio/generations"
# Streamed audio comes from the streaming decoder: within 1e-4 of the one-shot decode, then rounded to int16.
STREAM_TOL = 1e-4 + 0.5 / 32767 + 1e-7


# -- servers ----------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, args: list[str], log_path, env: dict):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = self.output()
            found = re.search(r"listening on (http://\S+)", text)
            if found:
                self.url = found.group(1)
                break
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{text}"
            assert time.monotonic() < deadline, f"server did not start within {START_TIMEOUT_S} s:\n{text}"
            time.sleep(0.1)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def server_env(engine_cache):
    # The servers load the tiny model through the same conversion cache as the in-process model.
    return {"ENGINEPY_CACHE": engine_cache, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def server(tiny_hf, server_env, tmp_path_factory):
    s = Server(["-m", "enginepy.serve", "--model", tiny_hf, "--device", "cpu", "--backend", "reference",
                "--dtype", "float32", "--max-batch", str(MAX_BATCH), "--max-waiting", str(MAX_WAITING),
                "--max-duration", str(MAX_DURATION), "--port", "0", "--log-level", "warning",
                "--max-body-bytes", "65536"],
               tmp_path_factory.mktemp("serve") / "server.log", server_env)
    yield s
    code = s.stop()
    # A graceful shutdown, then exit 128 + SIGTERM, as `enginepy` ends on SIGTERM.
    assert code == 128 + signal.SIGTERM and s.output().endswith("enginepy serve: terminated\n"), s.output()
    assert "Traceback" not in s.output()


@pytest.fixture(scope="module")
def faulty_server(tiny_hf, server_env, tmp_path_factory):
    s = Server([__file__, tiny_hf], tmp_path_factory.mktemp("serve-faulty") / "server.log", server_env)
    yield s
    s.stop()


@pytest.fixture
def mg(tiny_engine):
    assert tiny_engine.max_duration == MAX_DURATION and tiny_engine.backend == "reference"
    return tiny_engine


# -- helpers ----------------------------------------------------------------------------------------------------
def offline(mg, prompt: str, duration: float, seed: int, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The offline API's (waveform float32 [C, n], codes [K, T]) for one prompt: what `enginepy generate` makes."""
    mg.set_generation_params(duration=duration, seed=seed, **settings)
    wav, codes = mg.generate([prompt], return_tokens=True)
    return wav[0], codes[0]


def file_bytes(wav: torch.Tensor, sample_rate: int, path) -> bytes:
    write_audio(str(path), wav, sample_rate)
    with open(path, "rb") as f:
        return f.read()


def pcm16(wav: torch.Tensor) -> np.ndarray:
    """float32 [C, n] -> int16 [n, C]: clip, scale by 32767, round half to even."""
    return np.round(np.clip(wav.numpy().T, -1.0, 1.0) * 32767.0).astype(np.int16)


def assert_close_to(got: np.ndarray, wav: torch.Tensor) -> None:
    """Streamed int16 [n, C] vs the one-shot float32 [C, n]: same length, within STREAM_TOL."""
    want = np.clip(wav.numpy().T, -1.0, 1.0)
    assert got.shape == want.shape
    assert np.abs(got.astype(np.float64) / 32767.0 - want).max() <= STREAM_TOL


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            events.append((lines["event"], data))
    return events


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return parse_samples(r.text)


async def wait_metrics(client: httpx.AsyncClient, check, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until check(values) holds (at most `timeout` s); returns the values that passed."""
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(client)
        if check(m):
            return m
        assert time.monotonic() < deadline, f"metrics never reached the expected state: {m}"
        await asyncio.sleep(0.02)


def outcome(m: dict, name: str) -> float:
    return m[f'enginepy_requests_total{{outcome="{name}"}}']


IDLE = {"enginepy_requests_running": 0, "enginepy_requests_waiting": 0, "enginepy_requests_in_flight": 0,
        "enginepy_stream_rows": 0}


def idle(m: dict, max_batch: int = MAX_BATCH) -> bool:
    return all(m[k] == v for k, v in IDLE.items()) and m["enginepy_free_slots"] == max_batch


# -- audio equals the offline API -------------------------------------------------------------------------------
# (prompt, duration s, seed (None: the server draws one), sampling settings, response options)
CASES = [
    ("lo-fi beat with warm piano", 0.2, 1, {}, {}),
    ("jazz", 0.1, 2, dict(use_sampling=False), dict(response_format="flac")),
    ("dark techno with deep bass", 0.3, 3, dict(top_p=0.7), dict(response_format="pcm")),
    ("ambient pads", 0.16, 4, dict(temperature=0.6, top_k=0), dict(stream=True)),
    ("drum and bass", 0.12, 5, dict(cfg_coef=1.0), dict(stream=True, response_format="pcm")),
    ("folk guitar", 0.24, 6, dict(top_k=3, temperature=1.5, cfg_coef=5.0), dict(stream=True, stream_format="sse")),
    ("calm piano at night", 0.3, None, {}, {}),
    ("epic orchestral strings", 0.28, 8, dict(top_k=5), dict(stream=True)),
    ("funk bass groove", 0.1, 9, dict(use_sampling=False, cfg_coef=1.0), dict(stream=True, stream_format="sse")),
    ("reggae", 0.22, 10, dict(temperature=0), dict(response_format="flac")),
    ("retro 80s synth", 0.18, 11, dict(top_p=0.9, temperature=0.8), dict(stream=True, response_format="pcm")),
    ("soft rain", 0.14, 12, dict(cfg_coef=0.0), {}),
    ("house beat", 0.26, None, dict(top_k=8), dict(stream=True, stream_format="sse")),
    ("blues guitar", 0.2, 14, {}, dict(response_format="pcm")),
    ("choir vocals", 0.3, 15, dict(top_k=1), dict(stream=True)),
    ("minimal techno", 0.1, 16, dict(top_p=1.0), {}),
]


def check_response(mg, tmp_path, i: int, case, r: httpx.Response) -> None:
    prompt, duration, seed, settings, options = case
    assert r.status_code == 200, r.text
    if seed is not None:
        assert r.headers["x-seed"] == str(seed)
    wav, codes = offline(mg, prompt, duration, int(r.headers["x-seed"]), settings)
    assert r.headers["x-sample-rate"] == str(mg.sample_rate) and r.headers["x-channels"] == str(mg.audio_channels)
    fmt = options.get("response_format", "wav")
    if not options.get("stream"):
        if fmt == "pcm":
            assert r.content == pcm16(wav).astype("<i2").tobytes()
        else:  # the very bytes `enginepy generate` writes
            assert r.content == file_bytes(wav, mg.sample_rate, tmp_path / f"expected-{i}.{fmt}")
    elif options.get("stream_format") == "sse":
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        assert [e for e, _ in events[:-1]] == ["audio.delta"] * (len(events) - 1) and events[-1][0] == "audio.done"
        pcm = b"".join(base64.b64decode(d["audio"]) for _, d in events[:-1])
        assert_close_to(np.frombuffer(pcm, "<i2").reshape(-1, mg.audio_channels), wav)
        done = events[-1][1]
        assert done["seed"] == int(r.headers["x-seed"]) and done["frames"] == codes.shape[-1]
        assert done["sample_rate"] == mg.sample_rate and done["channels"] == mg.audio_channels
    else:
        body = r.content
        if fmt == "wav":
            riff, size, wave, fmt_id, fmt_len, tag, ch, rate, byte_rate, align, bits, data_id, data_size = (
                struct.unpack("<4sI4s4sIHHIIHH4sI", body[:44]))
            assert (riff, wave, fmt_id, data_id) == (b"RIFF", b"WAVE", b"fmt ", b"data")
            assert size == data_size == 0xFFFFFFFF and (fmt_len, tag, bits) == (16, 1, 16)
            assert (ch, rate, byte_rate, align) == (mg.audio_channels, mg.sample_rate,
                                                    mg.sample_rate * 2 * mg.audio_channels, 2 * mg.audio_channels)
            body = body[44:]
        assert_close_to(np.frombuffer(body, "<i2").reshape(-1, mg.audio_channels), wav)


def body_of(case) -> dict:
    prompt, duration, seed, settings, options = case
    body = dict(prompt=prompt, duration=duration, **settings, **options)
    if seed is not None:
        body["seed"] = seed
    return body


def test_16_concurrent_requests_equal_offline(server, mg, tmp_path):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            before = await metrics(client)
            responses = await asyncio.gather(*(client.post(GEN, json=body_of(c)) for c in CASES))
            after = await wait_metrics(client, idle)
            return before, responses, after

    before, responses, after = asyncio.run(main())
    for i, (case, r) in enumerate(zip(CASES, responses)):
        check_response(mg, tmp_path, i, case, r)
    assert outcome(after, "finished") - outcome(before, "finished") == len(CASES)
    assert outcome(after, "failed") == outcome(before, "failed")
    # Up to MAX_BATCH decode together: 16 requests took fewer steps than one after another would.
    steps = after["enginepy_engine_steps_total"] - before["enginepy_engine_steps_total"]
    assert steps < sum(int(c[1] * 50) + 3 for c in CASES)
    frames = sum(int(c[1] * 50) for c in CASES)
    assert after["enginepy_audio_seconds_total"] - before["enginepy_audio_seconds_total"] == pytest.approx(frames / 50)


def test_same_bytes_as_enginepy_generate_cli(server, tiny_hf, server_env, tmp_path):
    out = tmp_path / "cli.wav"
    r = subprocess.run([sys.executable, "-m", "enginepy", "generate", "warm piano with soft bass", "--model", tiny_hf,
                        "--device", "cpu", "--backend", "reference", "--dtype", "float32", "--duration", "0.24",
                        "--seed", "77", "--top-k", "5", "--cfg-coef", "2.5", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env={**os.environ, **server_env}, timeout=300)
    assert r.returncode == 0, r.stderr
    got = httpx.post(server.url + GEN, json=dict(prompt="warm piano with soft bass", duration=0.24, seed=77, top_k=5,
                                                 cfg_coef=2.5), timeout=TIMEOUT)
    assert got.status_code == 200 and got.content == out.read_bytes()


# -- bad requests -----------------------------------------------------------------------------------------------
def api_message(engine, **kwargs) -> str:
    """The message the step engine's add_request (the server's engine API) gives for these parameters."""
    with pytest.raises(InvalidParameter) as e:
        engine.add_request("check", "jazz", **{"duration": 1.0, **kwargs})
    return str(e.value)


# (body: dict, or raw bytes, param, parameters for the API's message or the message itself)
API_CASES = [
    (dict(duration=0), "duration"), (dict(duration=-1), "duration"), (dict(duration=MAX_DURATION + 1), "duration"),
    (dict(duration="10"), "duration"), (dict(duration=True), "duration"), (dict(duration=0.001), "duration"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_k=33), "top_k"), (dict(top_p=1.5), "top_p"),
    (dict(top_p="a"), "top_p"), (dict(temperature=-1), "temperature"), (dict(temperature=1e-5), "temperature"),
    (dict(cfg_coef=-1), "cfg_coef"), (dict(cfg_coef=2e6), "cfg_coef"), (dict(seed=-1), "seed"),
    (dict(seed=2**63), "seed"), (dict(seed=1.5), "seed"), (dict(seed="1"), "seed"),
    (dict(use_sampling="yes"), "use_sampling"), (dict(use_sampling=1), "use_sampling"),
]
SERVER_CASES = [
    (b"not json", None, "request body must be JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"", None, "request body must be a JSON object; got empty"),
    (b"[1, 2]", None, "request body must be a JSON object; got list"),
    (b'"jazz"', None, "request body must be a JSON object; got str"),
    (b'{"prompt": "jazz", "duration": NaN}', None, "request body must be JSON: NaN is not valid JSON"),
    (b'{"prompt": "jazz", "duration": 1e400}', "duration", "duration must be a finite number; got inf"),
    (b"\xff\xfe\x00", None, None),
    (dict(duration=1), "prompt", "prompt is required"),
    (dict(prompt=5), "prompt", "prompt must be a string; got int"),
    (dict(prompt=None), "prompt", "prompt must be a string; got NoneType"),
    (dict(prompt="jazz", topk=5), "topk", "unknown parameter 'topk'; the parameters are prompt, duration, seed, "
     "use_sampling, top_k, top_p, temperature, cfg_coef, cfg_coef_beta, two_step_cfg, melody, audio_prompt, "
     "response_format, stream, stream_format"),
    (dict(prompt="jazz", response_format="mp3"), "response_format", "response_format must be one of wav, flac, pcm; got 'mp3'"),
    (dict(prompt="jazz", stream="yes"), "stream", "stream must be true or false; got 'yes'"),
    (dict(prompt="jazz", stream=True, stream_format="x"), "stream_format", "stream_format must be one of audio, sse; got 'x'"),
    (dict(prompt="jazz", stream=True, response_format="flac"), "response_format",
     "response_format 'flac' cannot be streamed; use wav or pcm, or stream: false"),
]


def test_bad_requests_get_400_with_the_api_messages_and_the_server_keeps_serving(server, mg):
    long_prompt = "jazz " * 300
    with pytest.raises(InvalidParameter) as e:
        mg.conditioner.check_lengths([long_prompt], ["prompt"])
    engine = mg.engine(max_batch=1)
    cases = [(dict(prompt="jazz", **kw), param, api_message(engine, **kw)) for kw, param in API_CASES]
    cases += SERVER_CASES + [(dict(prompt=long_prompt), "prompt", str(e.value))]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            before = await metrics(client)
            for body, param, message in cases:
                r = await (client.post(GEN, content=body) if isinstance(body, bytes) else client.post(GEN, json=body))
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
                if message is not None:
                    assert error["message"] == message, body
                else:
                    assert error["message"].startswith("request body must be JSON: "), error
            # Too large: 413 whether or not the client announces the length.
            big = json.dumps(dict(prompt="x" * 70000)).encode()
            r = await client.post(GEN, content=big)
            assert r.status_code == 413 and r.json()["error"]["message"] == "request body must be at most 65536 bytes"

            async def chunks():
                for _ in range(20):
                    yield b" " * 4096

            r = await client.post(GEN, content=chunks())
            assert r.status_code == 413
            r = await client.get(GEN)
            assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
            ok = await client.post(GEN, json=dict(prompt="jazz", duration=0.1, seed=1))
            assert ok.status_code == 200
            after = await wait_metrics(client, idle)
            assert outcome(after, "invalid") - outcome(before, "invalid") == len(cases) + 2
            assert outcome(after, "finished") - outcome(before, "finished") == 1

    asyncio.run(main())


# -- disconnects, overflow, failures --------------------------------------------------------------------------
async def open_stream(client: httpx.AsyncClient, body: dict):
    """Send a streamed request and read its first chunk; returns (response, its byte iterator). Keep both: an
    async generator dropped half-way is finalised by the garbage collector, which can leave the connection pool
    of the client stuck."""
    request = client.build_request("POST", GEN, json=body)
    r = await client.send(request, stream=True)
    assert r.status_code == 200, await r.aread()
    chunks = r.aiter_raw()
    assert len(await chunks.__anext__()) > 0
    return r, chunks


async def close_stream(r: httpx.Response, chunks) -> None:
    """The client goes away mid-stream."""
    await chunks.aclose()
    await r.aclose()


def test_disconnect_mid_stream_frees_the_slot(server):
    frames = int(MAX_DURATION * 50)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            before = await wait_metrics(client, idle)
            r, chunks = await open_stream(client, dict(prompt="jazz", duration=MAX_DURATION, stream=True, seed=3))
            running = await metrics(client)
            assert running["enginepy_requests_running"] == 1 and running["enginepy_stream_rows"] == 1
            await close_stream(r, chunks)
            after = await wait_metrics(client, idle)
            assert outcome(after, "aborted") - outcome(before, "aborted") == 1
            assert outcome(after, "finished") == outcome(before, "finished")
            steps = after["enginepy_engine_steps_total"] - before["enginepy_engine_steps_total"]
            assert steps < frames  # it was stopped, not run to its end
            await asyncio.sleep(0.2)  # nothing is left running: the step count stays put
            assert (await metrics(client))["enginepy_engine_steps_total"] == after["enginepy_engine_steps_total"]

    asyncio.run(main())


def test_queue_overflow_gets_503_and_waiting_clients_that_leave_are_dropped(faulty_server):
    long = dict(prompt="jazz", duration=MAX_DURATION, stream=True)

    async def main():
        async with httpx.AsyncClient(base_url=faulty_server.url, timeout=TIMEOUT) as client:
            before = await wait_metrics(client, lambda m: idle(m, 2))
            a, a_chunks = await open_stream(client, {**long, "seed": 1})
            b, b_chunks = await open_stream(client, {**long, "seed": 2})
            waiting = asyncio.create_task(client.post(GEN, json={**long, "seed": 3}))
            await wait_metrics(client, lambda m: m["enginepy_requests_waiting"] == 1)
            full = await client.post(GEN, json=dict(prompt="jazz", duration=0.1))
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["message"] == "the engine's waiting queue is full (1 requests); retry later"
            waiting.cancel()  # a client that gives up while queued
            m = await wait_metrics(client, lambda m: m["enginepy_requests_waiting"] == 0)
            assert m["enginepy_requests_running"] == 2
            await close_stream(a, a_chunks)
            await close_stream(b, b_chunks)
            after = await wait_metrics(client, lambda m: idle(m, 2))
            assert outcome(after, "rejected") - outcome(before, "rejected") == 1
            assert outcome(after, "aborted") - outcome(before, "aborted") == 3
            assert (await client.post(GEN, json=dict(prompt="jazz", duration=0.1))).status_code == 200

    asyncio.run(main())


def test_engine_failure_fails_requests_in_flight_with_500_and_the_server_keeps_serving(faulty_server, mg, tmp_path):
    long = dict(prompt="jazz", duration=MAX_DURATION, stream=True, seed=4)
    message = "engine failure: RuntimeError: injected failure"

    async def main():
        async with httpx.AsyncClient(base_url=faulty_server.url, timeout=TIMEOUT) as client:
            before = await wait_metrics(client, lambda m: idle(m, 2))
            # 1. A non-streamed request makes the step fail; a streamed SSE neighbour gets an error event.
            sse, chunks = await open_stream(client, {**long, "stream_format": "sse"})
            bad = await client.post(GEN, json=dict(prompt=f"{FAIL_WORD} drums", duration=0.1))
            assert bad.status_code == 500 and bad.json()["error"] == {
                "message": message, "type": "server_error", "param": None, "code": None}
            rest = b"".join([c async for c in chunks]).decode()
            assert rest.rstrip().endswith(json.dumps({"type": "error", "error": {"message": message,
                                                                               "type": "server_error"}}))
            # 2. A streamed request fails before its first audio (500); an audio-stream neighbour is cut mid-body.
            audio, chunks = await open_stream(client, long)
            bad = await client.post(GEN, json=dict(prompt=f"{FAIL_WORD} bass", duration=0.1, stream=True))
            assert bad.status_code == 500 and bad.json()["error"]["message"] == message
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in chunks:
                    pass
            after = await wait_metrics(client, lambda m: idle(m, 2))
            assert after["enginepy_engine_failures_total"] - before["enginepy_engine_failures_total"] == 2
            assert outcome(after, "failed") - outcome(before, "failed") == 4
            health = (await client.get("/health")).json()
            assert health["status"] == "ok" and health["last_error"] == message
            # 3. Still serving, and still right.
            ok = await client.post(GEN, json=dict(prompt="soft rain", duration=0.2, seed=5))
            return ok

    ok = asyncio.run(main())
    assert ok.status_code == 200
    assert ok.content == file_bytes(offline(mg, "soft rain", 0.2, 5, {})[0], mg.sample_rate, tmp_path / "ok.wav")
    assert "injected failure" in faulty_server.output() and "Traceback" not in faulty_server.output()


@pytest.mark.triton
@pytest.mark.slow
def test_fast_backend_frees_kv_blocks_on_finish_and_disconnect(tiny_hf, server_env, tmp_path):
    """The paged KV pool of the fast backend (Triton; here under the interpreter, ~1 s a step): a finished and a
    disconnected request both give back every block they held."""
    s = Server(["-m", "enginepy.serve", "--model", tiny_hf, "--device", "cuda" if torch.cuda.is_available() else "cpu",
                "--backend", "fast", "--dtype", "float32", "--max-batch", "2", "--max-duration", "2", "--port", "0",
                "--log-level", "warning"], tmp_path / "server.log", server_env)

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=httpx.Timeout(300.0)) as client:
            before = await wait_metrics(client, lambda m: idle(m, 2))
            total = before["enginepy_kv_free_blocks"]
            assert total > 0
            assert (await client.post(GEN, json=dict(prompt="jazz", duration=0.06, seed=1))).status_code == 200
            assert (await wait_metrics(client, lambda m: idle(m, 2)))["enginepy_kv_free_blocks"] == total
            r, chunks = await open_stream(client, dict(prompt="jazz", duration=2, seed=2, stream=True))
            assert (await metrics(client))["enginepy_kv_free_blocks"] < total  # held while it runs
            await close_stream(r, chunks)
            after = await wait_metrics(client, lambda m: idle(m, 2), timeout=60)
            assert after["enginepy_kv_free_blocks"] == total
            assert outcome(after, "aborted") == 1 and outcome(after, "finished") == 1

    try:
        asyncio.run(main())
    finally:
        s.stop()


# -- the engine thread alone, in process -----------------------------------------------------------------------
def _collect(events: dict, rid: str):
    def sink(event):
        events.setdefault(rid, []).append(event)
    return sink


def _wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread that dies, on purpose
def test_engine_loop_events_aborts_and_a_dying_thread(mg):
    from enginepy.serve.loop import Accepted, EngineFailure, EngineLoop, Finished, Refused

    engine = mg.engine(max_batch=2, stream_audio=True)
    loop = EngineLoop(engine, mg.frame_rate, mg.decoder.dtype)
    events: dict[str, list] = {}
    loop.start()
    try:
        loop.submit("a", "jazz", dict(duration=0.2, seed=1, top_k=5), _collect(events, "a"), stream=False)
        loop.submit("b", "ambient pads", dict(duration=MAX_DURATION, seed=2), _collect(events, "b"), stream=True)
        loop.abort("b")  # drained before the next step: b never runs past its admission
        loop.submit("c", "jazz", dict(duration=0.2, top_k=-1), _collect(events, "c"), stream=False)
        _wait_for(lambda: len(events.get("a", [])) == 2)
        _wait_for(lambda: loop.stats.running == 0 and loop.stats.in_flight == 0)
        accepted, finished = events["a"]
        assert isinstance(accepted, Accepted) and accepted.seed == 1
        assert isinstance(finished, Finished) and finished.audio is None  # not streamed: codes only
        assert torch.equal(finished.codes, offline(mg, "jazz", 0.2, 1, dict(top_k=5))[1])
        assert [type(e) for e in events["b"]] == [Accepted]
        assert isinstance(events["c"][0], Refused) and "top_k must be" in str(events["c"][0].error)
        assert loop.stats.free_slots == 2 and engine.streamer.rows == []
        # A bug outside a step stops the thread: what is in flight fails instead of waiting forever.
        engine.has_unfinished_requests = lambda: 1 / 0
        loop.submit("d", "jazz", dict(duration=0.2, seed=3), _collect(events, "d"), stream=True)
        _wait_for(lambda: not loop.alive)
        assert [type(e) for e in events["d"]] == [Accepted, type(events["d"][1])]
        assert isinstance(events["d"][1].error, EngineFailure)
        assert str(events["d"][1].error) == "engine thread stopped: ZeroDivisionError: division by zero"
    finally:
        loop.stop()


# -- the other endpoints and the command line -------------------------------------------------------------------
def test_health_models_metrics_and_docs(server, mg):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        model = client.get("/v1/models").json()["data"][0]
        assert model["sample_rate"] == mg.sample_rate and model["channels"] == mg.audio_channels
        assert (model["max_duration"], model["max_batch"], model["max_waiting"]) == (MAX_DURATION, MAX_BATCH, MAX_WAITING)
        assert (model["backend"], model["dtype"], model["device"]) == ("reference", "float32", "cpu")
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        names = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE")}
        assert {"enginepy_requests_running", "enginepy_requests_waiting", "enginepy_engine_steps_total",
                "enginepy_audio_seconds_total", "enginepy_requests_total", "enginepy_time_to_first_audio_seconds", "enginepy_request_latency_seconds",
                "enginepy_step_seconds", "process_resident_memory_bytes"} <= names
        assert "enginepy_kv_free_blocks" not in names  # the reference backend has no block pool
        spec = client.get("/openapi.json").json()
        post = spec["paths"][GEN]["post"]
        fields = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert set(fields) == {"prompt", "duration", "seed", "use_sampling", "top_k", "top_p", "temperature",
                               "cfg_coef", "cfg_coef_beta", "two_step_cfg", "melody", "audio_prompt",
                               "response_format", "stream", "stream_format"}
        assert {"200", "400", "413", "500", "503"} <= set(post["responses"])
        assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be an integer >= 1; got 0"),
    (["--max-waiting", "-1"], "--max-waiting must be an integer >= 0; got -1"),
    (["--backend", "nope"], "--backend must be one of reference, fast; got 'nope'"),
    (["--port", "70000"], "--port must be in [0, 65535]; got 70000"),
    (["--max-duration", "0"], "--max-duration must be a positive number of seconds; got 0.0"),
    (["--max-text-len", "600"], "--max-text-len must be an integer in [1, 512]; got 600"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be an integer >= 1; got 0"),
    (["--max-batch", "two"], "argument --max-batch: invalid int value: 'two'"),
])
def test_cli_refuses_bad_options_before_loading(argv, message, capsys):
    from enginepy.serve.cli import main

    assert main(["--model", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_busy_port_is_refused_in_one_line():
    import socket

    from enginepy.serve.cli import bind

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(InvalidParameter, match=rf"cannot listen on 127.0.0.1:{port} \(Address already in use\)"):
            bind("127.0.0.1", port)
    sock = bind("127.0.0.1", 0)  # 0: a free port, the one the server then prints
    assert sock.getsockname()[1] > 0
    sock.close()


# -- soak -------------------------------------------------------------------------------------------------------
SOAK_S = 30.0
SOAK_CONCURRENCY = 12  # at most this many in flight: MAX_BATCH running + 8 waiting < MAX_WAITING, so never a 503
SOAK_MAX_REQUESTS = 2000


@pytest.mark.slow
def test_soak_random_arrivals_cancels_and_durations(server, mg):
    """SOAK_S of random arrivals (streamed or not, every format, 0.02-0.5 s of audio), a fifth of them
    cancelled at a random moment: no request fails, the server ends idle with every slot free, and its
    resident memory after the first third stays flat."""
    rng = random.Random(0)
    results = {"ok": 0, "cancelled": 0, "bad": []}
    checked: list[tuple[dict, bytes, dict]] = []  # a sample of whole responses, checked against offline below

    async def one(client: httpx.AsyncClient, i: int):
        stream = rng.random() < 0.5
        fmt = rng.choice(["wav", "pcm"] if stream else ["wav", "flac", "pcm"])
        body = dict(prompt=rng.choice(CASES)[0], duration=round(rng.uniform(0.02, 0.5), 2), seed=i,
                    top_k=rng.choice([0, 1, 5, 32]), stream=stream, response_format=fmt,
                    stream_format=rng.choice(["audio", "sse"]) if stream else "audio")
        cancel_after = rng.uniform(0.0, 0.5) if rng.random() < 0.2 else None
        try:
            r = await asyncio.wait_for(client.post(GEN, json=body), timeout=cancel_after or 60.0)
        except asyncio.TimeoutError:
            if cancel_after is None:
                results["bad"].append((body, "timeout"))
            else:
                results["cancelled"] += 1
            return
        if r.status_code != 200:
            results["bad"].append((body, r.status_code, r.text))
            return
        results["ok"] += 1
        if i % 40 == 0 and not stream:
            checked.append((body, r.content, dict(r.headers)))

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT,
                                     limits=httpx.Limits(max_connections=SOAK_CONCURRENCY)) as client:
            before = await wait_metrics(client, idle)
            slots = asyncio.Semaphore(SOAK_CONCURRENCY)
            tasks, rss = [], []
            start = time.monotonic()
            for i in range(SOAK_MAX_REQUESTS):
                elapsed = time.monotonic() - start
                if elapsed > SOAK_S:
                    break
                if not rss and elapsed > SOAK_S / 3:
                    rss.append((await metrics(client))["process_resident_memory_bytes"])
                await asyncio.sleep(rng.expovariate(15.0))  # Poisson arrivals, 15 per second
                await slots.acquire()
                task = asyncio.create_task(one(client, i))
                task.add_done_callback(lambda _: slots.release())
                tasks.append(task)
            t_end = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
            after = await wait_metrics(client, idle)
            print(f"drain {time.monotonic() - t_end:.1f} s")
            rss.append(after["process_resident_memory_bytes"])
            return before, after, rss, len(tasks)

    before, after, rss, sent = asyncio.run(main())
    assert results["bad"] == []
    assert results["ok"] + results["cancelled"] == sent and results["ok"] > sent / 2
    assert outcome(after, "failed") == outcome(before, "failed")
    assert outcome(after, "rejected") == outcome(before, "rejected")
    # A cancel can land after the server has sent the last byte: then the server counts it finished.
    finished = outcome(after, "finished") - outcome(before, "finished")
    assert results["ok"] <= finished <= sent and finished + outcome(after, "aborted") - outcome(before, "aborted") == sent
    # idle(): nothing running, waiting, tracked or open in the streaming decoder, every slot free.
    assert idle(after)
    growth_mb = (rss[1] - rss[0]) / 2**20
    assert growth_mb < 30, f"resident memory grew by {growth_mb:.1f} MB after warm-up"
    t0 = time.monotonic()
    for body, content, headers in checked:
        wav, _ = offline(mg, body["prompt"], body["duration"], body["seed"], dict(top_k=body["top_k"]))
        want = pcm16(wav)
        got = (np.frombuffer(content, "<i2").reshape(want.shape) if body["response_format"] == "pcm"
               else sf.read(io.BytesIO(content), dtype="int16", always_2d=True)[0])
        assert np.array_equal(got, want)
    print(f"offline checks {time.monotonic() - t0:.1f} s ({len(checked)})")
    print(f"soak: {sent} requests ({results['cancelled']} cancelled), "
          f"{after['enginepy_engine_steps_total'] - before['enginepy_engine_steps_total']:.0f} steps, "
          f"RSS {rss[0] / 2**20:.0f} -> {rss[1] / 2**20:.0f} MB")


# -- the failing server (started by the tests above; harmless unless a prompt contains FAIL_WORD) ---------------
def _faulty_server(model: str) -> None:
    from enginepy import MusicGen
    from enginepy.serve.app import create_app
    from enginepy.serve.cli import serve_app

    mg = MusicGen.from_pretrained(model, device="cpu", dtype="float32", backend="reference",
                                  max_duration=MAX_DURATION, max_batch=2)
    engine = mg.engine(max_batch=2, max_waiting=1, stream_audio=True)
    step = engine.runner.step

    def failing_step(slots):
        if any(FAIL_WORD in req.prompt for req in engine.running.values()):
            raise RuntimeError("injected failure")
        return step(slots)

    engine.runner.step = failing_step
    serve_app(create_app(mg, engine, model_id="tiny-faulty"), "127.0.0.1", 0, "warning")


if __name__ == "__main__":
    _faulty_server(sys.argv[1])
