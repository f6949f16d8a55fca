"""The engine thread: one background thread owns the Engine and steps it while work exists.

The Engine is not thread-safe, so everything that touches it (add_request, abort_request, step) runs here.
Other threads talk to it through a command queue, drained before every step, so that an abort frees its slot
(and KV blocks) before the next step runs. Results leave through per-request sinks: callables invoked on this
thread that must not block (the server's sink hands the event to its asyncio loop with call_soon_threadsafe).

Events a sink receives, in order: Accepted or Refused (the answer to the add), then zero or more Audio (streamed
requests only), then exactly one of Finished or Failed. An aborted request receives nothing more.

An exception from Engine.step() fails the requests that were running (Failed, the server answers 500), aborts
them so their slots are free, and the loop goes on: waiting requests and later ones are served.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import Engine
from ..precision import fp32_matmul_exact


@dataclass
class Accepted:
    seed: int


@dataclass
class Refused:
    error: Exception  # InvalidParameter (400) or EngineFull (503)


@dataclass
class Audio:
    audio: torch.Tensor  # float32 [C, n] on CPU, n > 0: newly final streamed audio


@dataclass
class Finished:
    codes: torch.Tensor  # int64 [K, frames] on CPU
    audio: torch.Tensor | None  # float32 [C, n] on CPU: the rest of a streamed request's audio, else None


@dataclass
class Failed:
    error: Exception


class EngineFailure(RuntimeError):
    """Engine.step() raised; every request running in that step fails with this."""


class ServerStopped(RuntimeError):
    """The server shut down while the request was in flight."""


class StreamedOnly:
    """A StreamingDecoder that decodes only the rows of requests that asked for streamed audio.

    The Engine streams every request it admits; a non-streamed response is decoded once, in one shot, from the
    finished codes (that is what makes it identical to `enginepy generate`), so streaming it as well would only
    cost time (on CPU a streamed frame of EnCodec 32 kHz costs about a third of a musicgen-small step).
    Implements the four calls the Engine makes (open, push, close, discard); `wanted` is managed by the loop.
    """

    def __init__(self, decoder, channels: int):
        self.decoder, self.channels = decoder, channels
        self.wanted: set[str] = set()

    @property
    def rows(self) -> list:
        return self.decoder.rows

    def open(self, row_id) -> None:
        if row_id in self.wanted:
            self.decoder.open(row_id)

    def push(self, chunks: dict) -> dict:
        mine = {rid: codes for rid, codes in chunks.items() if rid in self.decoder}
        return self.decoder.push(mine) if mine else {}

    def close(self, row_id) -> torch.Tensor:
        return self.decoder.close(row_id) if row_id in self.decoder else torch.zeros((self.channels, 0))

    def discard(self, row_id) -> None:
        if row_id in self.decoder:
            self.decoder.discard(row_id)


@dataclass
class LoopStats:
    """A snapshot the loop thread publishes after each iteration (read from any thread)."""

    running: int = 0
    waiting: int = 0
    in_flight: int = 0
    free_slots: int = 0
    free_blocks: int | None = None
    steps: int = 0
    failures: int = 0
    last_error: str | None = None


class EngineLoop:
    """Drives `engine` from a background thread; see the module docstring.

    engine: an Engine built with stream_audio=True (its streamer is wrapped in StreamedOnly here);
    check_prompt(prompt): run on this thread before add_request, raises InvalidParameter for a prompt the model
    refuses (too many tokens), so that it is a 400 and not a failure after queueing; metrics: ServerMetrics or None.
    """

    def __init__(self, engine: Engine, frame_rate: int, dtype: torch.dtype,
                 check_prompt: Callable[[str], None] | None = None, metrics=None):
        if engine.streamer is None:
            raise ValueError("the server's engine must stream audio: build it with mg.engine(stream_audio=True)")
        self.engine = engine
        self.streamer = StreamedOnly(engine.streamer, engine.cfg.audio_channels)
        engine.streamer = self.streamer
        self.frame_rate, self.dtype = frame_rate, dtype
        self.check_prompt = check_prompt
        self.metrics = metrics
        self.stats = LoopStats(free_slots=len(engine.free_slots), free_blocks=engine.num_free_blocks)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable] = {}
        self._thread = threading.Thread(target=self._run, name="enginepy-engine", daemon=True)

    # -- called from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is in flight with ServerStopped, end the thread and wait for it (at most `timeout` s)."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request_id: str, prompt: str, settings: dict, sink: Callable, stream: bool) -> None:
        """Queue Engine.add_request(request_id, prompt, **settings); the answer goes to `sink` (Accepted/Refused).
        stream: the request wants Audio events as its audio becomes final."""
        self._commands.put(("add", request_id, prompt, settings, sink, stream))

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away): its slot is free before the next step; its sink hears nothing."""
        self._commands.put(("abort", request_id))

    # -- the engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        # Grad mode is per thread; the fp32 matmul precision is process-wide (it also covers the one-shot decodes
        # of the server's decode thread) and must match what `enginepy generate` uses for identical results.
        with torch.no_grad(), fp32_matmul_exact(self.dtype):
            self._publish()
            running = True
            try:
                while running:
                    running = self._drain(block=not self.engine.has_unfinished_requests())
                    if running and self.engine.has_unfinished_requests():
                        self._step()
                    self._publish()
            except BaseException as e:  # a bug here, not in a step: fail what is in flight rather than hang it
                self.stats.last_error = f"engine thread stopped: {type(e).__name__}: {e}"
                self._shutdown(EngineFailure(self.stats.last_error))
                raise
            self._shutdown(ServerStopped("the server is shutting down"))

    def _drain(self, block: bool) -> bool:
        """Run the queued commands (waiting for one first when `block`); False once told to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, request_id: str, prompt: str, settings: dict, sink: Callable, stream: bool) -> None:
        try:
            if self.check_prompt is not None:
                self.check_prompt(prompt)
            req = self.engine.add_request(request_id, prompt, **settings)
        except Exception as e:  # InvalidParameter or EngineFull: the request never entered the engine
            sink(Refused(e))
            return
        self._sinks[request_id] = sink
        if stream:
            self.streamer.wanted.add(request_id)
        sink(Accepted(req.seed))

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._forget(request_id)

    def _forget(self, request_id: str):
        self.streamer.wanted.discard(request_id)
        return self._sinks.pop(request_id, None)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._fail_running(e)
            return
        elapsed = time.perf_counter() - start
        frames = 0
        for out in outputs:
            frames += out.new_frames.shape[-1]
            if out.error is not None:
                sink = self._forget(out.request_id)
                if sink is not None:
                    sink(Failed(out.error))
                continue
            audio = out.new_audio.cpu() if out.new_audio is not None and out.new_audio.shape[-1] else None
            if out.finished:
                sink = self._forget(out.request_id)
                if sink is not None:
                    sink(Finished(out.codes.cpu(), audio))
            elif audio is not None:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(Audio(audio))
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.step_time.observe(elapsed)
            self.metrics.audio_seconds.inc(frames / self.frame_rate)

    def _fail_running(self, error: Exception) -> None:
        """The step raised: fail and abort the requests it was running (and any it dropped on the way)."""
        message = f"engine failure: {type(error).__name__}: {error}"
        self.stats.failures += 1
        self.stats.last_error = message
        if self.metrics is not None:
            self.metrics.engine_failures.inc()
        caught = [rid for rid in self._sinks if rid in self.engine.running or rid not in self.engine.requests]
        for rid in caught:
            self._abort_quietly(rid)
            self._forget(rid)(Failed(EngineFailure(message)))

    def _abort_quietly(self, request_id: str) -> None:
        # After a failed step the engine's state is suspect; a second error here must not end the thread.
        try:
            self.engine.abort_request(request_id)
        except Exception:
            pass

    def _shutdown(self, error: Exception) -> None:
        for rid in list(self._sinks):
            self._abort_quietly(rid)
            self._forget(rid)(Failed(error))
        self._publish()

    def _publish(self) -> None:
        e, s = self.engine, self.stats
        s.running, s.waiting, s.in_flight = e.num_running, e.num_waiting, len(self._sinks)
        s.free_slots, s.free_blocks, s.steps = len(e.free_slots), e.num_free_blocks, e.steps_done
        m = self.metrics
        if m is not None:
            m.running.set(s.running)
            m.waiting.set(s.waiting)
            m.free_slots.set(s.free_slots)
            m.stream_rows.set(len(self.streamer.rows))
            if m.free_blocks is not None and s.free_blocks is not None:
                m.free_blocks.set(s.free_blocks)
