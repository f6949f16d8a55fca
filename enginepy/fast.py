"""The fast backend: the reference decoder's function on enginepy.ops, with static shapes.

Every buffer one decode step touches is allocated once (input tokens, positions, per-row steps, lengths and
seeds, text K/V and masks, the paged KV cache, the codes). A step is

  delay step input (C++) -> fused embedding (Triton) -> per layer: LN, fused QKV matmul, paged KV write and
  paged attention (Triton), cross-attention over the precomputed text K/V (Triton), FFN -> heads ->
  CFG mix (Triton) -> counter-based uniforms -> sampling (Triton) -> delay step write (C++)

with no host synchronisation: NaN/inf logits raise a device flag that is read once, after the last step.
On CUDA each step is replayed from a CUDA graph, captured once per (padded rows, text bucket, sampling
settings) after a warm-up, all graphs sharing one memory pool. Under TRITON_INTERPRET=1 on CPU the same
code runs eagerly (no graphs), which is how CI checks it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import ops
from .cache import PagedKVCache
from .errors import InvalidParameter
from .generate import NonFiniteLogits, SamplingParams, StepReporter
from .model import MusicGenDecoder
from .rng import uniforms

TEXT_BUCKET = 32  # text lengths are padded to a multiple of this, bounding the number of graphs


def _bucket(n: int, limit: int) -> int:
    """Smallest power of two >= n (capped at limit): padded batch sizes that each get one graph."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


class FastDecoder:
    """Static-shape generation for up to `max_batch` prompts of up to `max_frames` frames each."""

    def __init__(self, decoder: MusicGenDecoder, max_batch: int, max_frames: int, max_text_len: int = 256,
                 block_size: int = 16, use_graphs: bool | None = None):
        cfg = decoder.cfg
        device = decoder.device
        if not ops.triton_usable(device):
            raise InvalidParameter(
                "backend 'fast' needs a CUDA device, or TRITON_INTERPRET=1 exported before import to run its "
                "Triton kernels on CPU (slow: for tests); use backend='reference' on CPU"
            )
        self.decoder, self.cfg, self.device = decoder, cfg, device
        self.max_batch, self.max_frames = max_batch, max_frames
        self.max_rows = 2 * max_batch
        self.max_text_len = math.ceil(max_text_len / TEXT_BUCKET) * TEXT_BUCKET
        self.max_steps = max_frames + cfg.max_delay
        blocks_per_row = PagedKVCache.blocks_for(self.max_steps, block_size)
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, 1 + self.max_rows * blocks_per_row,
                                  block_size, self.max_rows, self.max_steps, decoder.dtype, device)
        r, b, k = self.max_rows, max_batch, cfg.num_codebooks
        i64 = dict(dtype=torch.int64, device=device)
        self.tokens = torch.full((r, k), cfg.special_token, **i64)
        self.positions = torch.zeros(r, **i64)
        self.seq_lens = torch.zeros(r, dtype=torch.int32, device=device)
        self.step = torch.zeros(b, **i64)
        self.lengths = torch.zeros(b, **i64)
        self.prompt_lengths = torch.zeros(b, **i64)
        self.seeds = torch.zeros(b, **i64)
        self.codes = torch.full((b, k, max_frames), cfg.special_token, **i64)
        self.delays = torch.tensor(cfg.delays, **i64)
        text_shape = (cfg.num_layers, r, self.max_text_len, cfg.num_heads, cfg.head_dim)
        self.text_k = torch.zeros(text_shape, dtype=decoder.dtype, device=device)
        self.text_v = torch.zeros(text_shape, dtype=decoder.dtype, device=device)
        self.text_mask = torch.zeros((r, self.max_text_len), dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # -- one decode step ------------------------------------------------------------------------------------
    def _step(self, rows: int, batch: int, text_len: int, params: SamplingParams) -> None:
        cfg, w = self.cfg, self.decoder.w
        h_, dh = cfg.num_heads, cfg.head_dim
        use_cfg = params.cfg_coef != 1.0
        greedy = not params.use_sampling or params.temperature == 0.0
        step, lengths = self.step[:batch], self.lengths[:batch]

        tokens = ops.delay_step_input(self.codes[:batch], step, lengths, self.delays, cfg.special_token)  # [B, K]
        self.tokens[:batch].copy_(tokens)
        if use_cfg:
            self.tokens[batch : 2 * batch].copy_(tokens)
        positions, seq_lens, tables = self.positions[:rows], self.seq_lens[:rows], self.cache.block_tables[:rows]
        x = ops.embedding(self.tokens[:rows], w("emb"), positions)  # [R, D]
        mask = self.text_mask[:rows, :text_len]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            h = self.decoder._ln(x, p + "ln1")
            q, k, v = F.linear(h, w(p + "qkv")).view(rows, 3, h_, dh).unbind(1)  # each [R, H, Dh]
            ops.kv_write(k, v, self.cache.k[i], self.cache.v[i], tables, positions)
            a = ops.self_attention(q, self.cache.k[i], self.cache.v[i], tables, seq_lens)
            x = x + F.linear(a.reshape(rows, -1), w(p + "out"))
            q = F.linear(self.decoder._ln(x, p + "ln_cross"), w(p + "cross_q")).view(rows, h_, dh)
            a = ops.cross_attention(q, self.text_k[i, :rows, :text_len], self.text_v[i, :rows, :text_len], mask)
            x = x + F.linear(a.reshape(rows, -1), w(p + "cross_out"))
            x = x + F.linear(F.gelu(F.linear(self.decoder._ln(x, p + "ln2"), w(p + "fc1"))), w(p + "fc2"))
        logits = torch.einsum("rd,kvd->rkv", self.decoder._ln(x, "ln_out"), w("heads"))  # [R, K, V]
        if use_cfg:
            # The temperature is folded into the mix; the sampler then divides by 1 (exact).
            mixed = ops.cfg_mix(logits[: 2 * batch], params.cfg_coef, None if greedy else params.temperature)
            temperature = 1.0
        else:
            mixed, temperature = logits[:batch].float(), params.temperature
        self.nonfinite |= ~torch.isfinite(mixed).all()
        u = uniforms(self.seeds[:batch], step, cfg.num_codebooks)  # [B, K]
        picked = ops.sample(mixed.reshape(batch * cfg.num_codebooks, -1), u.reshape(-1), use_sampling=not greedy,
                            temperature=temperature, top_k=params.top_k, top_p=params.top_p)
        ops.delay_step_write(self.codes[:batch], picked.view(batch, -1), step, lengths,
                             self.prompt_lengths[:batch], self.delays)
        self.step += 1
        self.positions += 1
        self.seq_lens += 1

    # -- a request ------------------------------------------------------------------------------------------
    def _reset(self, batch: int, frames: int, seeds: torch.Tensor) -> None:
        self.tokens.fill_(self.cfg.special_token)
        self.positions.zero_()
        self.seq_lens.fill_(1)  # the step being computed is cached before it is attended
        self.step.zero_()
        self.lengths.zero_()
        self.lengths[:batch] = frames
        self.prompt_lengths.zero_()
        self.seeds.zero_()
        self.seeds[:batch] = seeds.to(self.device)
        self.codes.fill_(self.cfg.special_token)
        self.nonfinite.zero_()

    def _set_text(self, cond: torch.Tensor, mask: torch.Tensor, rows: int) -> int:
        """Cross-attention K/V of every layer into the static text buffers; returns the bucketed text length."""
        n, t = cond.shape[:2]
        if t > self.max_text_len:
            raise InvalidParameter(f"a prompt has {t} text tokens but the fast backend allows {self.max_text_len}; "
                                   "raise max_text_len in from_pretrained or shorten the prompt")
        text_len = max(TEXT_BUCKET, math.ceil(t / TEXT_BUCKET) * TEXT_BUCKET)
        self.text_mask.zero_()
        self.text_mask[:n, :t] = mask
        cross = self.decoder.precompute_cross(cond, mask)  # k, v [L, n, H, t, Dh]
        self.text_k[:, :rows].zero_()
        self.text_v[:, :rows].zero_()
        self.text_k[:, :n, :t] = cross.k.transpose(2, 3)
        self.text_v[:, :n, :t] = cross.v.transpose(2, 3)
        return text_len

    def _run_step(self, rows: int, batch: int, text_len: int, params: SamplingParams, seeds, frames) -> None:
        if not self.use_graphs:
            self._step(rows, batch, text_len, params)
            return
        key = (rows, batch, text_len, params.use_sampling, params.temperature, params.top_k, params.top_p,
               params.cfg_coef)
        graph = self.graphs.get(key)
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the kernels and settles allocations before capture
                    self._step(rows, batch, text_len, params)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                self._step(rows, batch, text_len, params)
            self.graphs[key] = graph
            # Warm-up and capture advanced the state: start the request again. The K/V they wrote sit at
            # positions the real steps overwrite before reading them.
            self._reset(batch, frames, seeds)
        graph.replay()

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, cond_mask: torch.Tensor, frames: int, params: SamplingParams,
                 seeds: torch.Tensor, progress: bool = False,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Same contract as generate.generate_codes: cond [B, Tt, D], cond_mask [B, Tt], seeds [B] -> codes [B, K, T]."""
        batch = cond.shape[0]
        if batch > self.max_batch:
            raise InvalidParameter(f"{batch} prompts exceed the fast backend's max_batch={self.max_batch}; "
                                   "raise max_batch in from_pretrained or split the call")
        if frames > self.max_frames:
            raise InvalidParameter(f"{frames} frames exceed the fast backend's cache of {self.max_frames} frames; "
                                   "raise max_duration in from_pretrained")
        use_cfg = params.cfg_coef != 1.0
        live_rows = 2 * batch if use_cfg else batch
        rows = _bucket(live_rows, self.max_rows)
        cond, cond_mask = cond.to(self.device), cond_mask.to(self.device)
        if use_cfg:
            cond = torch.cat([cond, torch.zeros_like(cond)])
            cond_mask = torch.cat([cond_mask, torch.zeros_like(cond_mask)])
        steps = frames + self.cfg.max_delay
        owned = self.cache.assign(live_rows, steps)
        try:
            self._reset(batch, frames, seeds)
            text_len = self._set_text(cond, cond_mask, rows)
            with StepReporter(steps, progress, on_step) as report:
                for _ in range(steps):
                    self._run_step(rows, batch, text_len, params, seeds, frames)
                    report()
            if bool(self.nonfinite):
                raise NonFiniteLogits("the decoder produced NaN/inf logits; try dtype='float32'")
            return self.codes[:batch, :, :frames].clone()
        finally:
            self.cache.release(owned)
