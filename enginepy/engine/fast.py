"""The step engine's fast runner: the reference decoder's function on enginepy.ops, with static shapes.

Everything a decode step touches is allocated once, indexed by row or by slot:
  per row (2 per request with CFG: cond and null; 1 with cfg_coef 1): input tokens, position (-1: inactive),
    self-attention length, text length, owning slot, a block table into the paged self-attention pool and one
    into the paged text pool (the cross-attention K/V of its prompt, computed once at admission; null rows
    have none: length 0 gives zeros, what the reference's all-masked rows give);
  per slot (one request): step, length in frames, seed, codes, its rows, and its settings — CFG coefficient,
    temperature, greedy flag, top-k, top-p — read by the kernels from device tensors.
So one step has the same shapes whatever runs and whatever the settings: one CUDA graph per padded row count
(powers of two up to 2·max_slots), captured once at start-up, serves every mix of requests. A step is

  delay step input (C++) -> gather per row -> fused embedding (Triton) -> per layer (MusicGenDecoder.layer):
  LN, QKV matmul, paged KV write + paged attention, cross-attention over the paged text K/V, FFN -> heads ->
  per-request CFG mix with the temperature folded in (Triton) -> counter-based uniforms -> per-row sampling
  (Triton) -> delay step write (C++)

with no host synchronisation inside; NaN/inf logits raise a per-slot device flag read after the step.
Between steps the host admits and releases requests and hands out KV blocks as rows grow (one block per
block_size positions, from a budget reserved at admission so a running request never runs out).
Under TRITON_INTERPRET=1 on CPU the same code runs eagerly (no graphs), which is how CI checks it.
"""
from __future__ import annotations

import torch

from .. import ops, pattern
from ..cache import PagedKVCache
from ..errors import InvalidParameter
from ..model import CrossKV, KVCache, MusicGenDecoder
from ..rng import uniforms
from .reference import double_cfg_mix
from .request import Request, prefix_rows, prompt_frames, request_rows, request_text

BLOCK_SIZE = 16


def row_buckets(max_rows: int) -> list[int]:
    """Padded row counts that get a graph: powers of two below max_rows, and max_rows."""
    buckets, n = [], 1
    while n < max_rows:
        buckets.append(n)
        n *= 2
    return buckets + [max_rows]


def _bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class FastRunner:
    """Static-shape decode steps for up to `max_slots` requests of up to `max_frames` frames and prompts of up to
    `max_text_len` tokens. kv_blocks / text_blocks size the paged pools (default: the worst case, so admission
    never waits for memory)."""

    def __init__(self, decoder: MusicGenDecoder, conditioner, max_slots: int, max_frames: int,
                 max_text_len: int = 256, block_size: int = BLOCK_SIZE, kv_blocks: int | None = None,
                 text_blocks: int | None = None, use_graphs: bool | None = None):
        cfg, device = decoder.cfg, decoder.device
        if not ops.triton_usable(device):
            raise InvalidParameter(
                "backend 'fast' needs a CUDA device, or TRITON_INTERPRET=1 exported before import to run its "
                "Triton kernels on CPU (slow: for tests); use backend='reference' on CPU"
            )
        self.decoder, self.conditioner, self.cfg, self.device = decoder, conditioner, cfg, device
        self.max_slots, self.max_frames, self.max_text_len = max_slots, max_frames, max_text_len
        # Prefix models (MusicGen-Melody) have up to 3 rows per request (double CFG) and their self-attention
        # sequence starts with the prefix; they have no cross-attention (the text pool stays empty).
        rows_per_slot = 3 if cfg.prefix else 2
        s, r, k = max_slots, rows_per_slot * max_slots, cfg.num_codebooks
        self.max_rows = r
        self.max_prefix = cfg.chroma_length + max_text_len if cfg.prefix else 0
        self.max_steps = self.max_prefix + max_frames + cfg.max_delay
        blocks_per_row = PagedKVCache.blocks_for(self.max_steps, block_size)
        text_per_row = 0 if cfg.prefix else PagedKVCache.blocks_for(max_text_len, block_size)
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                                  1 + (kv_blocks if kv_blocks is not None else r * blocks_per_row),
                                  block_size, r, self.max_steps, decoder.dtype, device)
        self.text = PagedKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                                 1 + (text_blocks if text_blocks is not None else s * text_per_row),
                                 block_size, r, max_text_len, decoder.dtype, device)
        i64 = dict(dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        # per row
        self.tokens = torch.full((r, k), cfg.special_token, **i64)
        self.positions = torch.full((r,), -1, **i64)
        self.seq_lens = torch.zeros(r, dtype=torch.int32, device=device)
        self.text_lens = torch.zeros(r, dtype=torch.int32, device=device)
        self.row_slot = torch.zeros(r, **i64)
        # per slot
        self.step_t = torch.zeros(s, **i64)
        self.lengths = torch.zeros(s, **i64)
        self.prompt_lengths = torch.zeros(s, **i64)
        self.seeds = torch.zeros(s, **i64)
        self.codes = torch.full((s, k, max_frames), cfg.special_token, **i64)
        self.cond_rows = torch.zeros(s, **i64)
        self.null_rows = torch.full((s,), -1, **i64)
        self.wav_rows = torch.zeros(s, **i64)  # double CFG's text-dropped row (the null row for text models)
        self.cfg_coef = torch.ones(s, **f32)
        self.mix_temperature = torch.ones(s, **f32)
        self.cfg_beta = torch.ones(s, **f32)
        self.double_cfg = torch.zeros(s, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(s, dtype=torch.bool, device=device)
        # Sampler rows are (slot, codebook); the temperature is folded into the mix, so the sampler's is 1.
        self.sampler = ops.sample_settings(torch.ones(s * k, dtype=torch.bool, device=device),
                                           torch.ones(s * k, **f32), torch.zeros(s * k, **i64),
                                           torch.zeros(s * k, **f32), cfg.vocab_size)
        self.delays = torch.tensor(cfg.delays, **i64)
        # host bookkeeping
        self.free_rows = list(range(r - 1, -1, -1))
        self.slot_rows: dict[int, list[int]] = {}
        self.row_blocks: dict[int, list[int]] = {}
        self.text_row_blocks: dict[int, list[int]] = {}
        self.row_pos: dict[int, int] = {}  # per running row: the position its next step writes
        self.reserved = 0  # blocks promised to running rows but not yet handed out
        self.row_reserve: dict[int, int] = {}
        self.buckets = row_buckets(r)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.use_graphs:
            self._capture()

    # -- capacity -------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Self-attention blocks neither in use nor promised to a running request."""
        return self.cache.allocator.num_free - self.reserved

    def _prefix_lens(self, request: Request) -> list[int]:
        """Per row, the positions of a prefix model's prefix: chroma_length + the text part (its tokens, or
        text_len; one for two-step CFG's null row); zeros for text models."""
        rows = request_rows(self.cfg, request.params)
        if not self.cfg.prefix:
            return [0] * rows
        lens = [self.cfg.chroma_length + max(request.text_tokens, request.text_len or 0)] * rows
        if rows > 1 and request.params.two_step_cfg:
            lens[-1] = self.cfg.chroma_length + 1
        return lens

    def _blocks_needed(self, request: Request) -> list[int]:
        """KV blocks each row of the request needs over its whole run."""
        tail = request.frames + self.cfg.max_delay
        return [PagedKVCache.blocks_for(p + tail, self.cache.block_size) for p in self._prefix_lens(request)]

    def can_admit(self, request: Request) -> bool:
        blocks = self._blocks_needed(request)
        return len(self.free_rows) >= len(blocks) and self.free_blocks >= sum(blocks)

    # -- admission and release (host, between steps) ---------------------------------------------------------
    @torch.no_grad()
    def admit(self, slot: int, request: Request) -> None:
        cfg, dec = self.cfg, self.decoder
        if request.frames > self.max_frames:
            raise InvalidParameter(f"{request.frames} frames exceed the fast backend's cache of {self.max_frames} "
                                   "frames; raise max_duration in from_pretrained")
        states, mask = request_text(self.conditioner, request, cfg.text_hidden_size)
        states, mask = states.to(self.device), mask.to(self.device)
        # Only the attended text positions are paged in: the unconditional zero vector (mask False) has none.
        t = int(mask[0].sum())
        if t > self.max_text_len or mask.shape[1] > self.max_text_len:
            raise InvalidParameter(f"the prompt has {max(t, mask.shape[1])} text tokens but the fast backend allows "
                                   f"{self.max_text_len}; raise max_text_len in from_pretrained or shorten the prompt")
        blocks = self._blocks_needed(request)
        rows_needed = len(blocks)
        rows = [self.free_rows.pop() for _ in range(rows_needed)]
        self.slot_rows[slot] = rows
        self.reserved += sum(blocks)
        cond_row = rows[0]
        prefixes, cross = None, None
        if cfg.prefix:
            prefixes = [dec.embed_prefix(p) for p in prefix_rows(dec, request, states, mask)]  # [1, P_r, D] each
            t = 0
        else:
            cond = dec.project_text(states, mask)
            cross = dec.precompute_cross(cond, mask)  # k, v [L, 1, H, Tt, Dh]
            text_blocks = self.text.allocator.allocate(PagedKVCache.blocks_for(t, self.text.block_size))
            self.text_row_blocks[cond_row] = text_blocks
            self.text.block_tables[cond_row, : len(text_blocks)] = torch.tensor(text_blocks, dtype=torch.int32)
            zero = torch.zeros(1, dtype=torch.int64, device=self.device)
            for i in range(cfg.num_layers):
                ops.kv_write(cross.k[i, :, :, :t].transpose(1, 2), cross.v[i, :, :, :t].transpose(1, 2),
                             self.text.k[i], self.text.v[i], self.text.block_tables[cond_row : cond_row + 1], zero)
            if rows_needed > 1 and prompt_frames(request):  # for the prefill: the null row's conditioning is zero,
                # so are its K/V (the projections have no bias), and it attends nothing
                cross = CrossKV(*(torch.cat([kv, torch.zeros_like(kv)], dim=1) for kv in (cross.k, cross.v)),
                                torch.cat([cross.mask, torch.zeros_like(cross.mask)]))
        offsets = [0] * rows_needed if prefixes is None else [p.shape[1] for p in prefixes]
        tp = prompt_frames(request)
        for j, row in enumerate(rows):
            self.row_blocks[row] = []
            self.row_reserve[row] = blocks[j]
            self.row_pos[row] = offsets[j] + tp
            self.positions[row] = offsets[j] + tp
            self.seq_lens[row] = offsets[j] + tp + 1  # the step being computed is cached before it is attended
            self.text_lens[row] = t if j == 0 else 0
            self.row_slot[row] = slot
        self.codes[slot].fill_(cfg.special_token)
        if tp or prefixes is not None:
            if prefixes is None or len(set(offsets)) == 1:
                self._prefill(rows, request, cross, None if prefixes is None else torch.cat(prefixes))
            else:  # two-step CFG: prefixes of different lengths, one forward per row
                for row, p in zip(rows, prefixes):
                    self._prefill([row], request, None, p)
        p = request.params
        self.step_t[slot] = tp
        self.lengths[slot] = request.frames
        self.prompt_lengths[slot] = tp
        self.seeds[slot] = request.seed
        self.cond_rows[slot] = cond_row
        self.null_rows[slot] = rows[-1] if len(rows) > 1 else -1
        self.wav_rows[slot] = rows[1] if len(rows) == 3 else rows[-1]
        self.cfg_coef[slot] = p.cfg_coef
        self.mix_temperature[slot] = 1.0 if p.greedy else p.temperature
        self.double_cfg[slot] = p.cfg_coef_beta is not None
        self.cfg_beta[slot] = 1.0 if p.cfg_coef_beta is None else p.cfg_coef_beta
        self.nonfinite[slot] = False
        k = cfg.num_codebooks
        ops.sample_settings(torch.full((k,), p.greedy, dtype=torch.bool, device=self.device),
                            torch.ones(k, dtype=torch.float32, device=self.device),
                            torch.full((k,), p.top_k, dtype=torch.int64, device=self.device),
                            torch.full((k,), p.top_p, dtype=torch.float32, device=self.device), cfg.vocab_size,
                            out={name: value[slot * k : (slot + 1) * k] for name, value in self.sampler.items()})

    def _prefill(self, rows: list[int], request: Request, cross, prefix: torch.Tensor | None) -> None:
        """The positions before decoding starts, in one forward (the reference decoder's math, into a temporary
        static cache), paged into the rows' first blocks: a prefix model's prefix [rows, P, D], then, for an audio
        continuation, pattern columns 0 .. Tp-1 (decode steps 0 .. Tp-1 predict prompt frames only); decoding
        resumes at step Tp. cross: the rows' cross-attention K/V (text models)."""
        cfg, dec, bs = self.cfg, self.decoder, self.cache.block_size
        slot = int(self.row_slot[rows[0]])
        tp = prompt_frames(request)
        if tp:
            self.codes[slot, :, :tp] = request.prompt_codes.to(self.device)
        columns = pattern.delay_scatter(self.codes[slot : slot + 1, :, :tp], self.delays, cfg.special_token)[:, :, :tp]
        n = len(rows)
        length = tp + (0 if prefix is None else prefix.shape[1])
        cache = KVCache.allocate(cfg, n, length, dec.dtype, self.device)
        dec.prefill(columns.expand(n, -1, -1), 0, cache, cross, prefix)
        for row in rows:
            for index in range(PagedKVCache.blocks_for(length, bs)):
                self.row_blocks[row].append(self.cache.grow(row, index))
                self.row_reserve[row] -= 1
                self.reserved -= 1
        tables = self.cache.block_tables[rows]
        start = torch.zeros(n, dtype=torch.int64, device=self.device)
        for i in range(cfg.num_layers):
            ops.kv_write(cache.k[i].transpose(1, 2), cache.v[i].transpose(1, 2), self.cache.k[i], self.cache.v[i],
                         tables, start)

    def release(self, slot: int) -> None:
        for row in self.slot_rows.pop(slot, []):
            self.row_pos.pop(row, None)
            self.cache.clear_row(row, self.row_blocks.pop(row))
            self.reserved -= self.row_reserve.pop(row)
            text_blocks = self.text_row_blocks.pop(row, None)
            if text_blocks is not None:
                self.text.clear_row(row, text_blocks)
            self.positions[row] = -1
            self.seq_lens[row] = 0
            self.text_lens[row] = 0
            self.free_rows.append(row)
        self.free_rows.sort(reverse=True)
        self.lengths[slot] = 0
        self.prompt_lengths[slot] = 0
        self.cond_rows[slot] = 0
        self.null_rows[slot] = -1
        self.wav_rows[slot] = 0

    def read_frames(self, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """(slot, start, stop) -> frames start..stop-1 of that slot's codes, int64 [K, stop - start] on CPU,
        in one device-to-host copy."""
        parts = torch.cat([self.codes[slot, :, a:b] for slot, a, b in spans], dim=1).cpu()
        return list(parts.split([b - a for _, a, b in spans], dim=1))

    # -- one decode step ------------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Hand each running row the block its next position needs (from its reservation)."""
        bs = self.cache.block_size
        for row, pos in self.row_pos.items():
            if pos % bs == 0:
                self.row_blocks[row].append(self.cache.grow(row, pos // bs))
                self.row_reserve[row] -= 1
                self.reserved -= 1

    def _step(self, rows: int) -> None:
        cfg, dec = self.cfg, self.decoder
        h, dh = cfg.num_heads, cfg.head_dim
        slot_tokens = ops.delay_step_input(self.codes, self.step_t, self.lengths, self.delays, cfg.special_token)
        torch.index_select(slot_tokens, 0, self.row_slot[:rows], out=self.tokens[:rows])  # [R, K]
        positions, seq_lens = self.positions[:rows], self.seq_lens[:rows]
        tables, text_tables, text_lens = self.cache.block_tables[:rows], self.text.block_tables[:rows], self.text_lens[:rows]
        active = positions >= 0
        x = ops.embedding(self.tokens[:rows], dec.w("emb"), positions.clamp(min=0))  # [R, D]

        def self_attn(i, q, k, v):
            ops.kv_write(k.view(rows, h, dh), v.view(rows, h, dh), self.cache.k[i], self.cache.v[i], tables, positions)
            return ops.paged_attention(q.view(rows, h, dh), self.cache.k[i], self.cache.v[i], tables,
                                       seq_lens).view(rows, -1)

        def cross_attn(i, q):
            return ops.paged_attention(q.view(rows, h, dh), self.text.k[i], self.text.v[i], text_tables,
                                       text_lens).view(rows, -1)

        for i in range(cfg.num_layers):
            x = dec.layer(i, x, self_attn, None if cfg.prefix else cross_attn)
        logits = dec.logits(x)  # [R, K, V]
        mixed = ops.cfg_mix_rows(logits, self.cond_rows, self.null_rows, self.cfg_coef, self.mix_temperature)
        # Double CFG (few requests use it; static shapes, so every step computes it and keeps it where asked).
        c, u = logits.float()[self.cond_rows], logits.float()[self.null_rows.clamp(min=0)]
        w = logits.float()[self.wav_rows]
        alpha, beta = self.cfg_coef[:, None, None], self.cfg_beta[:, None, None]
        double = double_cfg_mix(c, w, u, alpha, beta) / self.mix_temperature[:, None, None]
        mixed = torch.where(self.double_cfg[:, None, None], double, mixed)
        finite = torch.isfinite(mixed).flatten(1).all(dim=1)
        self.nonfinite |= ~finite
        # A failed request's tokens are discarded; zero its logits so the sampler never sees an all-NaN row
        # (the Triton interpreter's max over one raises).
        mixed = torch.where(finite[:, None, None], mixed, torch.zeros_like(mixed))
        u = uniforms(self.seeds, self.step_t, cfg.num_codebooks)  # [S, K]
        picked = ops.sample_rows(mixed.view(-1, cfg.vocab_size), u.view(-1), self.sampler)
        ops.delay_step_write(self.codes, picked.view(self.max_slots, -1), self.step_t, self.lengths,
                             self.prompt_lengths, self.delays)
        self.step_t += 1
        positions += active
        seq_lens += active

    def _capture(self) -> None:
        """One graph per row bucket, captured with every row inactive (nothing is written), before any request."""
        pool = torch.cuda.graph_pool_handle()
        for rows in self.buckets:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the kernels and settles allocations before capture
                    self._step(rows)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(rows)
            self.graphs[rows] = graph
        self.step_t.zero_()
        self.nonfinite.zero_()
        self.codes.fill_(self.cfg.special_token)

    @torch.no_grad()
    def step(self, slots: list[int]) -> dict[int, bool]:
        """One decode step for every admitted request (`slots` lists them); returns slot -> True where its
        logits were not finite."""
        self._grow()
        used = max(r for s in slots for r in self.slot_rows[s]) + 1
        rows = _bucket(used, self.buckets)
        if self.use_graphs:
            self.graphs[rows].replay()
        else:
            self._step(rows)
        for s in slots:
            for row in self.slot_rows[s]:
                self.row_pos[row] += 1
        bad = self.nonfinite.cpu()
        return {s: bool(bad[s]) for s in slots}
