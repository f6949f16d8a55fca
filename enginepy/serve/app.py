"""The HTTP API (FastAPI): text in, music out, over the step engine.

    POST /v1/audio/generations   {"prompt": "lo-fi beat", "duration": 8, "seed": 1, "stream": true, ...}
    GET  /health  /v1/models  /metrics      (and FastAPI's /docs, /openapi.json)

One engine thread (loop.EngineLoop) owns the engine; the event loop only parses, queues and sends bytes. A
request is validated here with the API's own checks (same messages); its audio inputs, base64 audio files (a
`melody` for MusicGen-Melody models, an `audio_prompt` to continue), are decoded, checked and turned into a
chroma and EnCodec codes on an input thread, as `MusicGen.generate_with_chroma` / `generate_continuation` do.
It is then added on the engine thread (which answers Accepted, or Refused: 400 for a prompt over the token
limit, 503 when the waiting queue is full) and then fed events through its own asyncio queue. A non-streamed response is decoded once from the finished codes (one-shot
EnCodec, on a decode thread) — the same samples as `enginepy generate` for the same seed and settings; a streamed
one sends the streaming decoder's pieces as they become final (within 1e-4 of the one-shot decode before the
16-bit rounding). A client that goes away is noticed by a watcher task and its request aborted before the next
engine step.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio_prompt import check_sample_rate, check_waveforms
from ..engine.request import EngineFull, make_params, request_frames
from ..errors import InvalidParameter
from . import MAX_BODY_BYTES, encode
from .loop import Accepted, Audio, EngineLoop, Failed, Finished, Refused
from .metrics import ServerMetrics

DEFAULT_DURATION = 10.0
# Seconds a client refused with 503 is told to wait. The queue drains as requests finish, which takes seconds.
RETRY_AFTER_S = 1
FIELDS = ("prompt", "duration", "seed", "use_sampling", "top_k", "top_p", "temperature", "cfg_coef", "cfg_coef_beta",
          "two_step_cfg", "melody", "audio_prompt", "response_format", "stream", "stream_format")
# Fields holding base64 audio files.
AUDIO_FIELDS = ("melody", "audio_prompt")
AUDIO_FILE = "an audio file (WAV, FLAC or Ogg)"
STREAM_FORMATS = ("audio", "sse")


class GenerationBody(BaseModel):
    """The request body, for the OpenAPI schema; bodies are checked by `parse_request` (the API's messages)."""

    prompt: str = Field(description="text description of the music")
    duration: float = Field(DEFAULT_DURATION, description="seconds of audio, in (0, max_duration] (default 10, or "
                                                          "max_duration when that is shorter)")
    seed: int | None = Field(None, description="0 .. 2**63-1; default: random (returned in the X-Seed header)")
    use_sampling: bool = Field(True, description="false: greedy decoding")
    top_k: int | None = Field(None, description="keep the k most likely tokens (default 250; 0 = off)")
    top_p: float = Field(0.0, description="nucleus mass in [0, 1]; > 0 overrides top_k")
    temperature: float = Field(1.0, description="0 (greedy) or >= 1e-4")
    cfg_coef: float = Field(3.0, description="classifier-free guidance coefficient in [0, 1e6]")
    cfg_coef_beta: float | None = Field(
        None, description="double classifier-free guidance (audiocraft): u + cfg_coef·(w + beta·(c − w) − u), w the "
                          "logits without the text; in [0, 1e6]; null: off")
    two_step_cfg: bool = Field(False, description="conditional and null rows as separate forwards (audiocraft's "
                                                  "two_step_cfg); not with cfg_coef_beta")
    melody: str | None = Field(
        None, description="MusicGen-Melody models only: base64 of an audio file (WAV, FLAC or Ogg; any sample rate and "
                          "channels) whose chroma conditions the music. It counts toward the request body limit "
                          "(413 beyond it; `enginepy serve --max-body-bytes`, default 8 MiB)")
    audio_prompt: str | None = Field(
        None, description="base64 of an audio file (WAV, FLAC or Ogg; converted to the model's rate and channels) to "
                          "continue: the audio starts with it and it counts toward duration, so it must be shorter. "
                          "It counts toward the request body limit (413 beyond it; `enginepy serve "
                          "--max-body-bytes`, default 8 MiB)")
    response_format: Literal["wav", "flac", "pcm"] = Field(
        "wav", description="16-bit WAV, 16-bit FLAC, or raw s16le PCM (channels interleaved)")
    stream: bool = Field(False, description="send audio as it is generated")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: chunked bytes (wav: a header of unknown length first); sse: events "
                             "audio.delta (base64 s16le PCM) then audio.done")


class BadRequest(Exception):
    """A request refused before it reaches the engine: status 400 (or 413), a message and the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass
class Job:
    """A parsed request: the prompt, the keyword arguments of Engine.add_request, and how to answer. audio: the
    audio files given ("melody", "audio_prompt" -> the file's bytes), not yet decoded (see `audio_inputs`)."""

    prompt: str
    settings: dict
    response_format: str
    stream: bool
    stream_format: str
    audio: dict[str, bytes] = field(default_factory=dict)


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
            413: "invalid_request_error", 503: "server_overloaded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    """The API's messages start with the parameter's name ("top_k must be ..."): that names the field."""
    name = message.split(" ", 1)[0]
    return name if name in FIELDS else None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _audio_file(value, name: str) -> bytes:
    """A base64 field -> the audio file's bytes (white space, as line-wrapping encoders put in, is ignored)."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string: base64 of {AUDIO_FILE}; got {type(value).__name__}", name)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: characters beyond ASCII
        raise BadRequest(f"{name} must be base64 of {AUDIO_FILE}: {e}", name) from None
    if not data:
        raise BadRequest(f"{name} is empty: give base64 of {AUDIO_FILE}", name)
    return data


def parse_request(body: bytes, vocab_size: int, frame_rate: int, max_duration: float, *,
                  melody_model: bool = False) -> Job:
    """Check a request body with the API's own checks; BadRequest(message, param) names what is wrong.
    melody_model: the model takes a melody (MusicGen-Melody). Audio fields are only base64-decoded here."""
    try:
        data = json.loads(body, parse_constant=_reject_constant) if body.strip() else None
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"request body must be JSON: {e}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None and not body.strip() else type(data).__name__
        raise BadRequest(f"request body must be a JSON object; got {kind}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(FIELDS)}", unknown[0])
    if "prompt" not in data:
        raise BadRequest("prompt is required", "prompt")
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise BadRequest(f"prompt must be a string; got {type(prompt).__name__}", "prompt")

    def value(name: str, default):
        return default if data.get(name) is None else data[name]  # null means the default

    duration = value("duration", min(DEFAULT_DURATION, max_duration))
    settings = dict(seed=value("seed", None), use_sampling=value("use_sampling", True), top_k=value("top_k", None),
                    top_p=value("top_p", 0.0), temperature=value("temperature", 1.0), cfg_coef=value("cfg_coef", 3.0),
                    cfg_coef_beta=value("cfg_coef_beta", None), two_step_cfg=value("two_step_cfg", False))
    try:
        request_frames(duration, frame_rate, max_duration)
        make_params(vocab_size, **settings)
    except InvalidParameter as e:
        raise BadRequest(str(e), _param_of(str(e))) from None
    response_format = value("response_format", "wav")
    if response_format not in encode.FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(encode.FORMATS)}; got {response_format!r}",
                         "response_format")
    stream = value("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false; got {stream!r}", "stream")
    stream_format = value("stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise BadRequest(f"stream_format must be one of {', '.join(STREAM_FORMATS)}; got {stream_format!r}",
                         "stream_format")
    if stream and response_format not in encode.STREAMABLE:
        raise BadRequest(f"response_format {response_format!r} cannot be streamed; use "
                         f"{' or '.join(encode.STREAMABLE)}, or stream: false", "response_format")
    if value("melody", None) is not None and not melody_model:
        raise BadRequest("melody needs a MusicGen-Melody model (this one is conditioned on text only)", "melody")
    audio = {name: _audio_file(data[name], name) for name in AUDIO_FIELDS if value(name, None) is not None}
    return Job(prompt, dict(duration=duration, **settings), response_format, stream, stream_format, audio)


def decode_audio(data: bytes, name: str) -> tuple[torch.Tensor, int]:
    """An audio file's bytes (what libsndfile reads: WAV, FLAC, Ogg) -> (float32 [C, T], sample rate in Hz), with
    the checks of `enginepy generate --melody / --continue` (samples, finite values, a sane rate)."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError by case
        reason = getattr(e, "error_string", None) or str(e)
        raise BadRequest(f"{name} cannot be read as audio ({reason})", name) from None
    if samples.shape[0] == 0:
        raise BadRequest(f"{name} holds no audio samples", name)
    try:
        check_sample_rate(rate, f"{name} sample rate")
        wav = check_waveforms(torch.from_numpy(samples.T.copy()), name)
    except InvalidParameter as e:
        raise BadRequest(str(e), name) from None
    return wav[0], int(rate)


def audio_inputs(mg, job: Job) -> dict:
    """The job's audio files -> keyword arguments of Engine.add_request, computed as the API computes them:
    melody -> chroma float32 [Nc, 12] (`generate_with_chroma`), audio_prompt -> prompt_codes int64 [K, Tp]
    (`generate_continuation`: converted to the model's rate and channels, EnCodec-encoded), Tp < the request's
    frames. Heavy (resampling, STFT, EnCodec): runs off the event loop. BadRequest names the field."""
    extra = {}
    if "melody" in job.audio:
        wav, rate = decode_audio(job.audio["melody"], "melody")
        try:
            extra["melody"] = mg._melody_chroma([wav], rate)[0]
        except InvalidParameter as e:
            raise BadRequest(str(e), "melody") from None
    if "audio_prompt" in job.audio:
        wav, rate = decode_audio(job.audio["audio_prompt"], "audio_prompt")
        codes = mg._prompt_codes(wav[None], rate)[0]
        duration = job.settings["duration"]
        frames = request_frames(duration, mg.frame_rate, mg.max_duration)
        if codes.shape[-1] >= frames:
            raise BadRequest(f"audio_prompt lasts {wav.shape[-1] / rate:g} s ({codes.shape[-1]} frames); it must be "
                             f"shorter than duration ({duration:g} s, {frames} frames), which includes it",
                             "audio_prompt")
        extra["prompt_codes"] = codes
    return extra


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (whatever Content-Length claims)."""
    too_large = BadRequest(f"request body must be at most {limit} bytes", None, status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_GONE = object()  # put in a request's event queue when its client disconnects


async def _watch_disconnect(receive, events: asyncio.Queue) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(_GONE)


class StreamFailed(RuntimeError):
    """The engine failed a request after its audio stream had started: the connection is closed mid-body, so the
    client sees an incomplete response rather than a short one that looks whole."""


class _QuietStreamFailures(logging.Filter):
    """uvicorn logs a traceback for every exception that ends a response; StreamFailed is already logged here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamFailed))


class _Tracked:
    """One request's life on the server: its event queue, disconnect watcher and outcome. close() is idempotent
    and runs whatever way the request ends: it aborts the engine request unless it finished or failed."""

    def __init__(self, server: "_Server", request: Request, stream: bool, arrival: float):
        self.server, self.arrival, self.label = server, arrival, "true" if stream else "false"
        self.request_id = f"gen-{uuid.uuid4().hex}"
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        events = self.events

        def sink(event) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
                pass

        self.sink = sink
        self.watcher = asyncio.create_task(_watch_disconnect(request.receive, self.events))
        self.outcome: str | None = None
        self.seed: int | None = None
        self.first_audio = False
        self.closed = False
        server.metrics.in_flight.inc()

    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.server.metrics.outcome(outcome)
            if outcome == "finished":
                self.server.metrics.latency.labels(self.label).observe(time.perf_counter() - self.arrival)

    def audio_sent(self) -> None:
        if not self.first_audio:
            self.first_audio = True
            self.server.metrics.ttfa.labels(self.label).observe(time.perf_counter() - self.arrival)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watcher.cancel()
        if self.outcome is None:
            self.server.loop.abort(self.request_id)
            self.end("aborted")
        self.server.metrics.in_flight.dec()


class _AudioStream(StreamingResponse):
    """A StreamingResponse that closes its request however the response ends, even if its body is never read
    (a client gone before the first byte): an aborted request's slot is freed either way."""

    def __init__(self, content, tracked: _Tracked, **kwargs):
        super().__init__(content, **kwargs)
        self.tracked = tracked

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.tracked.close()


class _Server:
    """State shared by the routes of one app."""

    def __init__(self, mg, engine, model_id: str, max_body_bytes: int):
        self.mg, self.engine, self.model_id, self.max_body_bytes = mg, engine, model_id, max_body_bytes
        self.metrics = ServerMetrics(has_kv_blocks=engine.num_free_blocks is not None)
        self.loop = EngineLoop(engine, mg.frame_rate, mg.decoder.dtype,
                               check_prompt=lambda p: mg.conditioner.check_lengths([p], ["prompt"]),
                               metrics=self.metrics)
        # One-shot decodes of finished requests run here, off the event loop and off the engine thread.
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enginepy-decode")
        # Audio inputs (decode, resample, chroma, EnCodec encode) likewise, on their own thread so that a long
        # input never delays a finished response.
        self.inputs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enginepy-audio-in")
        self.log = logging.getLogger("enginepy.serve")

    def decode(self, codes, response_format: str) -> bytes:
        """codes int64 [K, frames] -> the body (one-shot decode, exactly what `generate` does)."""
        wav = self.mg.generate_audio(codes[None])[0]  # float32 [C, samples]
        return encode.encode(wav, self.mg.sample_rate, response_format)

    def headers(self, tracked: _Tracked, seed: int) -> dict:
        return {"X-Seed": str(seed), "X-Request-Id": tracked.request_id, "X-Sample-Rate": str(self.mg.sample_rate),
                "X-Channels": str(self.mg.audio_channels)}

    def failure(self, tracked: _Tracked, error: Exception) -> JSONResponse:
        tracked.end("failed")
        if isinstance(error, InvalidParameter):
            return error_response(400, str(error), _param_of(str(error)))
        self.log.error("request %s failed: %s", tracked.request_id, error)
        return error_response(500, str(error))

    async def generate(self, request: Request) -> Response:
        arrival = time.perf_counter()
        try:
            body = await read_body(request, self.max_body_bytes)
            cfg = self.mg.cfg
            job = parse_request(body, cfg.vocab_size, cfg.frame_rate, self.mg.max_duration, melody_model=cfg.prefix)
            if job.audio:
                job.settings.update(await asyncio.get_running_loop().run_in_executor(
                    self.inputs, audio_inputs, self.mg, job))
        except BadRequest as e:
            self.metrics.outcome("invalid")
            return error_response(e.status, e.message, e.param)
        if not self.loop.alive:  # nothing would answer: say so instead of waiting forever
            self.metrics.outcome("failed")
            return error_response(500, self.loop.stats.last_error or "the engine thread has stopped")
        tracked = _Tracked(self, request, job.stream, arrival)
        streaming = False
        try:
            self.loop.submit(tracked.request_id, job.prompt, job.settings, tracked.sink, job.stream)
            answer = await tracked.events.get()
            if answer is _GONE:
                return Response(status_code=499)
            if isinstance(answer, Refused):
                tracked.end("rejected" if isinstance(answer.error, EngineFull) else "invalid")
                if isinstance(answer.error, EngineFull):
                    return error_response(503, str(answer.error), headers={"Retry-After": str(RETRY_AFTER_S)})
                return error_response(400, str(answer.error), _param_of(str(answer.error)))
            assert isinstance(answer, Accepted)
            tracked.seed = answer.seed
            headers = self.headers(tracked, answer.seed)
            event = await tracked.events.get()
            if event is _GONE:
                return Response(status_code=499)
            if isinstance(event, Failed):
                return self.failure(tracked, event.error)
            if not job.stream:
                body = await asyncio.get_running_loop().run_in_executor(
                    self.decoder, self.decode, event.codes, job.response_format)
                tracked.audio_sent()
                tracked.end("finished")
                return Response(body, media_type=encode.MEDIA_TYPES[job.response_format], headers=headers)
            streaming = True
            if job.stream_format == "sse":
                headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                return _AudioStream(self.sse_body(tracked, event), tracked, media_type="text/event-stream",
                                    headers=headers)
            return _AudioStream(self.audio_body(tracked, event, job.response_format), tracked,
                                media_type=encode.MEDIA_TYPES[job.response_format], headers=headers)
        finally:
            if not streaming:
                tracked.close()

    async def _pieces(self, tracked: _Tracked, first):
        """Yield (pcm bytes, end event or None) as events arrive, several events joined when they queue up."""
        event = first
        while True:
            batch = [event]
            while not tracked.events.empty():
                batch.append(tracked.events.get_nowait())
            pcm, end = [], None
            for ev in batch:
                if isinstance(ev, (Audio, Finished)) and ev.audio is not None:
                    pcm.append(encode.pcm_bytes(ev.audio))
                if ev is _GONE or isinstance(ev, (Finished, Failed)):
                    end = ev
                    break
            yield b"".join(pcm), end
            if end is not None:
                return
            event = await tracked.events.get()

    async def audio_body(self, tracked: _Tracked, first, response_format: str):
        head = encode.streaming_wav_header(self.mg.sample_rate, self.mg.audio_channels) if response_format == "wav" else b""
        async for pcm, end in self._pieces(tracked, first):
            if isinstance(end, Failed):
                tracked.end("failed")
                self.log.error("request %s failed mid-stream: %s", tracked.request_id, end.error)
                raise StreamFailed(str(end.error))
            if end is _GONE:
                return
            if pcm:
                yield head + pcm
                head = b""
                tracked.audio_sent()
            if isinstance(end, Finished):
                tracked.end("finished")

    async def sse_body(self, tracked: _Tracked, first):
        async for pcm, end in self._pieces(tracked, first):
            if pcm:
                yield encode.sse_audio_delta(pcm)
                tracked.audio_sent()
            if isinstance(end, Finished):
                tracked.end("finished")
                yield encode.sse_event("audio.done", {"seed": tracked.seed, "frames": end.codes.shape[-1],
                                                      "sample_rate": self.mg.sample_rate,
                                                      "channels": self.mg.audio_channels})
            elif isinstance(end, Failed):
                tracked.end("failed")
                self.log.error("request %s failed mid-stream: %s", tracked.request_id, end.error)
                yield encode.sse_event("error", {"error": {"message": str(end.error), "type": "server_error"}})


def create_app(mg, engine=None, *, max_batch: int | None = None, max_waiting: int | None = None,
               model_id: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `mg` (a loaded MusicGen: its codec decodes, its limits bound the requests).

    engine: an Engine of `mg` built with stream_audio=True to serve from (default: mg.engine(max_batch,
    max_waiting, stream_audio=True)); the app's engine thread starts with the app (lifespan) and stops with it.
    model_id: the name /v1/models reports. max_body_bytes: larger request bodies get 413.
    """
    if engine is None:
        engine = mg.engine(max_batch=max_batch, max_waiting=max_waiting, stream_audio=True)
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise InvalidParameter(f"max_body_bytes must be a positive integer; got {max_body_bytes!r}")
    server = _Server(mg, engine, model_id or "musicgen", max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet = _QuietStreamFailures()
        logging.getLogger("uvicorn.error").addFilter(quiet)
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()
            server.decoder.shutdown(wait=False, cancel_futures=True)
            server.inputs.shutdown(wait=False, cancel_futures=True)
            logging.getLogger("uvicorn.error").removeFilter(quiet)

    app = FastAPI(title="enginepy", version=_version(), lifespan=lifespan,
                  description="MusicGen inference: text in, music out (WAV, FLAC or 16-bit PCM; whole or streamed).")
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    schema = GenerationBody.model_json_schema()
    audio = {"content": {t: {} for t in (*encode.MEDIA_TYPES.values(), "text/event-stream")},
             "description": "the audio (headers X-Seed, X-Sample-Rate, X-Channels, X-Request-Id)"}
    errors = {str(code): {"description": text} for code, text in (
        (400, "invalid body (error.param names the field)"), (413, "body too large"),
        (503, "the waiting queue is full (Retry-After)"), (500, "the engine failed the request"))}

    @app.post("/v1/audio/generations",
              summary="Generate music from a text prompt (and a melody or audio to continue)",
              responses={200: audio, **errors}, response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}})
    async def generations(request: Request) -> Response:
        return await server.generate(request)

    @app.get("/health", summary="200 while the engine thread runs")
    async def health():
        s = server.loop.stats
        body = {"status": "ok" if server.loop.alive else "engine thread stopped", "running": s.running,
                "waiting": s.waiting, "engine_failures": s.failures, "last_error": s.last_error}
        return JSONResponse(body, status_code=200 if server.loop.alive else 503)

    @app.get("/v1/models", summary="The model served")
    async def models():
        return {"object": "list", "data": [{
            "id": server.model_id, "object": "model", "owned_by": "enginepy", "sample_rate": mg.sample_rate,
            "channels": mg.audio_channels, "frame_rate": mg.frame_rate, "max_duration": mg.max_duration,
            "max_text_len": mg.max_text_len, "max_batch": engine.max_batch, "max_waiting": engine.max_waiting,
            "backend": mg.backend, "device": str(mg.device), "dtype": str(mg.decoder.dtype).replace("torch.", ""),
        }]}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _version() -> str:
    from .. import __version__

    return __version__
