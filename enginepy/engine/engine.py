"""The step engine: continuous batching over a fixed set of row slots (the shape of vLLM's LLMEngine).

    eng = mg.engine(max_batch=16)
    eng.add_request("r1", "jazz", duration=10, seed=1, top_k=250, cfg_coef=3.0)
    while eng.has_unfinished_requests():
        for out in eng.step():      # RequestOutput: request_id, finished, new_frames [K, n], codes on finish
            ...

Requests wait in a FIFO queue (bounded by max_waiting; beyond it add_request raises EngineFull) and take a free
slot at the start of the next step: their prompt is encoded, their cross-attention K/V computed and their first
decode step runs in that same step. A finished or aborted request frees its slot (and its KV blocks) at once.
Nothing a request computes depends on the other rows, so its codes equal a run of it alone with the same seed.
Not thread-safe: one thread drives an engine (a server runs one loop thread).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

import torch

from ..errors import InvalidParameter, non_finite_logits_message
from .request import (EngineFull, NonFiniteLogits, Request, RequestOutput, RequestState, check_melody,
                      check_prompt_codes, check_request_id, check_text_len, draw_seed, make_params, prompt_frames,
                      request_frames)


class Engine:
    """Continuous batching over a runner (ReferenceRunner or FastRunner) for one loaded MusicGen."""

    def __init__(self, runner, cfg, max_duration: float, max_waiting: int | None = None, streamer=None):
        """streamer: a codec_stream.StreamingDecoder to decode each request's new frames to audio as they complete
        (RequestOutput.new_audio; the pieces of a request join to its one-shot decode), or None."""
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 0):
            raise InvalidParameter(f"max_waiting must be None or an integer >= 0; got {max_waiting!r}")
        self.runner, self.cfg, self.max_duration = runner, cfg, max_duration
        self.max_batch = runner.max_slots
        self.max_waiting = max_waiting
        self.streamer = streamer
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.free_slots = list(range(runner.max_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self.steps_done = 0
        self._arrivals = itertools.count()

    # -- the request API --------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, *, duration: float = 10.0, seed: int | None = None,
                    use_sampling: bool = True, top_k: int | None = None, top_p: float = 0.0,
                    temperature: float = 1.0, cfg_coef: float = 3.0, cfg_coef_beta: float | None = None,
                    two_step_cfg: bool = False, prompt_codes: torch.Tensor | None = None,
                    frames: int | None = None, text: tuple[torch.Tensor, torch.Tensor] | None = None,
                    melody: torch.Tensor | None = None, text_len: int | None = None) -> Request:
        """Queue one prompt (validated exactly as `set_generation_params`); seed None draws a random one, which
        the returned Request (and every RequestOutput) carries. A duplicate request_id is refused.

        prompt None generates unconditionally (guidance is then moot: both halves would be the null condition,
        so the null rows are skipped). prompt_codes int [K, Tp]: continue this audio prompt; the output codes
        start with it and it counts toward the duration. frames: an exact frame count instead of `duration`
        (long-form windows). text: precomputed T5 output of `prompt` (see Request).
        MusicGen-Melody models only: melody, one-hot chroma float [Nc, 12] (enginepy.chroma.chroma_features of
        the melody; None: no melody); text_len, pad the text part of the prefix to this many positions (see
        Request). Without a prompt, a melody keeps guidance (its null rows drop the melody too)."""
        check_request_id(request_id)
        if request_id in self.requests:
            raise InvalidParameter(f"request_id {request_id!r} is already in the engine")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidParameter(f"prompt must be a string; got {type(prompt).__name__} (None generates unconditionally)")
        if text is not None:
            text_tokens = text[1].shape[1]
        elif prompt is not None:  # refused now, not at admission
            text_tokens = self.runner.conditioner.check_lengths([prompt], ["prompt"])[0]
        else:
            text_tokens = 1  # the unconditional zero vector
        if frames is None:
            frames = request_frames(duration, self.cfg.frame_rate, self.max_duration)
        elif (isinstance(frames, bool) or not isinstance(frames, int)
              or not 1 <= frames <= int(self.max_duration * self.cfg.frame_rate)):
            raise InvalidParameter(f"frames must be an integer in [1, {int(self.max_duration * self.cfg.frame_rate)}]; "
                                   f"got {frames!r}")
        prompt_codes = check_prompt_codes(prompt_codes, self.cfg.num_codebooks, self.cfg.vocab_size, frames)
        melody = check_melody(melody, self.cfg)
        text_len = check_text_len(text_len, self.cfg, getattr(self.runner.conditioner, "max_tokens", None))
        params = make_params(self.cfg.vocab_size, use_sampling, top_k, top_p, temperature, cfg_coef, seed,
                             cfg_coef_beta, two_step_cfg)
        if prompt is None and melody is None:
            params = dataclasses.replace(params, cfg_coef=1.0, cfg_coef_beta=None)
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise EngineFull(f"the engine's waiting queue is full ({self.max_waiting} requests); retry later")
        req = Request(request_id, prompt, frames, draw_seed() if seed is None else int(seed), params,
                      next(self._arrivals), prompt_codes=prompt_codes, text=text, melody=melody, text_len=text_len,
                      text_tokens=text_tokens)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting or running request; its slot and KV blocks are free at once. False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        elif req.state is RequestState.RUNNING:
            self._free(req)
        req.state = RequestState.ABORTED
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int | None:
        """Free KV-cache blocks of the fast runner's pool (None for the reference runner, which has none)."""
        return self.runner.free_blocks

    # -- one step -----------------------------------------------------------------------------------------------
    def _free(self, req: Request) -> None:
        self.runner.release(req.slot)
        if self.streamer is not None and req.state is RequestState.RUNNING and not req.closed:
            self.streamer.discard(req.request_id)
        self.running.pop(req.request_id, None)
        self.free_slots.append(req.slot)
        self.free_slots.sort(reverse=True)
        req.slot = -1

    def _admit(self) -> list[RequestOutput]:
        failed = []
        while self.waiting and self.free_slots and self.runner.can_admit(self.waiting[0]):
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop()
            try:
                self.runner.admit(req.slot, req)
            except Exception as e:  # a prompt the conditioner refuses fails its own request only
                self.runner.release(req.slot)
                self.free_slots.append(req.slot)
                self.free_slots.sort(reverse=True)
                req.state = RequestState.FAILED
                self.requests.pop(req.request_id, None)
                failed.append(self._output(req, finished=True, error=e))
                continue
            req.state = RequestState.RUNNING
            req.step = prompt_frames(req)  # the runner prefilled the prompt's decode steps
            self.running[req.request_id] = req
            if self.streamer is not None:
                self.streamer.open(req.request_id)
        return failed

    def _output(self, req: Request, finished: bool, error: Exception | None = None,
                new_frames: torch.Tensor | None = None) -> RequestOutput:
        if new_frames is None:
            new_frames = torch.empty((self.cfg.num_codebooks, 0), dtype=torch.int64)
        codes = None
        if finished and error is None:
            codes = torch.cat(req.chunks, dim=1) if req.chunks else new_frames[:, :0]
        return RequestOutput(req.request_id, finished, new_frames, codes=codes, error=error, seed=req.seed)

    def step(self) -> list[RequestOutput]:
        """Admit waiting requests into free slots, run one decode step for every running request, and report
        each running request's newly completed frames (and, on its last step, its codes)."""
        outputs = self._admit()
        if not self.running:
            return outputs
        reqs = sorted(self.running.values(), key=lambda r: r.slot)
        bad = self.runner.step([r.slot for r in reqs])
        self.steps_done += 1
        max_delay = self.cfg.max_delay
        audio_frames: dict[str, torch.Tensor] = {}
        finished: list[Request] = []
        live, spans = [], []
        for req in reqs:
            req.step += 1
            if bad.get(req.slot):
                err = NonFiniteLogits(non_finite_logits_message(req.step - 1, self.runner.decoder.dtype,
                                                                req.params.cfg_coef, req.request_id))
                self._free(req)
                self.requests.pop(req.request_id, None)
                req.state = RequestState.FAILED
                outputs.append(self._output(req, finished=True, error=err))
                continue
            done = min(req.step - max_delay, req.frames)  # frames complete after this step
            live.append((req, done))
            if done > req.frames_out:
                spans.append((req.slot, req.frames_out, done))
        new_codes = dict(zip((s[0] for s in spans), self.runner.read_frames(spans))) if spans else {}
        for req, done in live:
            new = new_codes.get(req.slot)
            if new is not None:
                req.chunks.append(new)
                req.frames_out = done
                audio_frames[req.request_id] = new
            is_last = req.step == req.frames + max_delay
            outputs.append(self._output(req, finished=is_last, new_frames=new))
            if is_last:
                finished.append(req)
        if self.streamer is not None:
            audio = self.streamer.push(audio_frames) if audio_frames else {}
            for out in outputs:
                if out.error is None and out.request_id in self.running:
                    piece = audio.get(out.request_id)
                    if piece is None:
                        piece = torch.zeros((self.cfg.audio_channels, 0))
                    if out.finished:
                        piece = torch.cat([piece.cpu(), self.streamer.close(out.request_id).cpu()], dim=-1)
                        self.running[out.request_id].closed = True
                    out.new_audio = piece.cpu()
        for req in finished:
            self._free(req)
            self.requests.pop(req.request_id, None)
            req.state = RequestState.FINISHED
        return outputs
