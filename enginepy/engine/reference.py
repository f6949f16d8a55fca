"""The step engine's reference runner: plain PyTorch, any device, the oracle of the fast runner.

Each admitted request owns its state: a static self-attention cache [L, rows, H, steps, Dh] sized for its own
length, its cross-attention K/V computed once from its own prompt (encoded alone, so that nothing about it
depends on what else runs), its codes [1, K, frames] and its settings. A step stacks the rows of every running
request for the matmuls (row results do not depend on their neighbours) and runs each request's attention over
its own cache, so a request's output is the same whatever else runs and whenever it joined.
Rows: 2 per request with classifier-free guidance (cond, then null), 1 when cfg_coef == 1; prefix-conditioned
models (MusicGen-Melody) with double CFG: 3 (cond, melody-only, null). Their prefix [chroma ; text] is prefilled
at admission into the first positions of the request's cache, and decode step s sits at position P + s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import pattern
from ..model import CrossKV, KVCache, MusicGenDecoder, attention
from ..rng import uniforms
from ..sampling import cfg_mix, sample_tokens
from .request import Request, SamplingParams, prefix_rows, prompt_frames, request_rows, request_text


def double_cfg_mix(cond, wav, uncond, alpha, beta):
    """audiocraft's double CFG on fp32 logits, in its order of operations: u + α·(w + β·(c − w) − u).
    alpha/beta: floats or tensors broadcastable to the logits."""
    return uncond + alpha * (wav + beta * (cond - wav) - uncond)


@dataclass
class _Slot:
    rows: int
    params: SamplingParams
    seed: torch.Tensor  # int64 [1]
    lengths: torch.Tensor  # int64 [1]
    prompt_lengths: torch.Tensor  # int64 [1]: frames of audio prompt (never overwritten)
    cache: KVCache
    cross: CrossKV | None  # None for prefix-conditioned models
    codes: torch.Tensor  # int64 [1, K, frames]
    step: int = 0
    offsets: list[int] | None = None  # per row: prefix positions before decode step 0 (prefix models)


class ReferenceRunner:
    """Runs decode steps for up to `max_slots` requests at once; see the module docstring."""

    def __init__(self, decoder: MusicGenDecoder, conditioner, max_slots: int):
        self.decoder, self.conditioner, self.cfg = decoder, conditioner, decoder.cfg
        self.device = decoder.device
        self.max_slots = max_slots
        self.slots: dict[int, _Slot] = {}
        self.delays = torch.tensor(self.cfg.delays, dtype=torch.int64, device=self.device)

    @property
    def free_blocks(self) -> int | None:
        """The reference runner allocates each request's cache on admission: no block pool."""
        return None

    def can_admit(self, request: Request) -> bool:
        return len(self.slots) < self.max_slots

    @torch.no_grad()
    def admit(self, slot: int, request: Request) -> None:
        cfg, dec, dev = self.cfg, self.decoder, self.device
        states, mask = request_text(self.conditioner, request, cfg.text_hidden_size)
        states, mask = states.to(dev), mask.to(dev)
        rows = request_rows(cfg, request.params)
        prefixes, cross = None, None
        if cfg.prefix:
            prefixes = [dec.embed_prefix(p) for p in prefix_rows(dec, request, states, mask)]  # [1, P_r, D] each
        else:
            cond = dec.project_text(states, mask)
            if rows > 1:
                cond = torch.cat([cond, torch.zeros_like(cond)])
                mask = torch.cat([mask, torch.zeros_like(mask)])
            cross = dec.precompute_cross(cond, mask)
        offsets = [0] * rows if prefixes is None else [p.shape[1] for p in prefixes]
        tp = prompt_frames(request)
        codes = torch.full((1, cfg.num_codebooks, request.frames), cfg.special_token, dtype=torch.int64, device=dev)
        st = _Slot(
            rows=rows,
            params=request.params,
            seed=torch.tensor([request.seed], dtype=torch.int64, device=dev),
            lengths=torch.tensor([request.frames], dtype=torch.int64, device=dev),
            prompt_lengths=torch.tensor([tp], dtype=torch.int64, device=dev),
            cache=KVCache.allocate(cfg, rows, max(offsets) + request.frames + cfg.max_delay, dec.dtype, dev),
            cross=cross,
            codes=codes,
            offsets=offsets,
        )
        if tp:
            codes[0, :, :tp] = request.prompt_codes.to(dev)
        if tp or prefixes is not None:
            # Decode steps 0 .. Tp-1 predict prompt frames only (every prediction would be discarded): their K/V
            # come from one forward over the prefix (if any) and pattern columns 0 .. Tp-1, and decoding resumes at
            # step Tp. Rows whose prefixes differ in length (two-step CFG) run one forward each.
            columns = pattern.delay_scatter(codes[:, :, :tp], self.delays, cfg.special_token)[:, :, :tp]
            if prefixes is None or len(set(offsets)) == 1:
                prefix = None if prefixes is None else torch.cat(prefixes)
                dec.prefill(columns.expand(rows, -1, -1), 0, st.cache, st.cross, prefix)
            else:
                for r, p in enumerate(prefixes):
                    row_cache = KVCache(st.cache.k[:, r : r + 1], st.cache.v[:, r : r + 1])
                    dec.prefill(columns, 0, row_cache, None, p)
            st.step = tp
        self.slots[slot] = st

    def release(self, slot: int) -> None:
        self.slots.pop(slot, None)

    def read_frames(self, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """(slot, start, stop) -> frames start..stop-1 of that slot's codes, int64 [K, stop - start] on CPU."""
        return [self.slots[slot].codes[0, :, a:b].cpu() for slot, a, b in spans]

    @torch.no_grad()
    def step(self, slots: list[int]) -> dict[int, bool]:
        """One decode step for each slot in `slots`; returns slot -> True where the logits were not finite."""
        cfg, dec = self.cfg, self.decoder
        states = [self.slots[s] for s in slots]
        tokens, positions, spans = [], [], []
        row = 0
        for st in states:
            step = torch.tensor([st.step], dtype=torch.int64, device=self.device)
            t = pattern.delay_step_input(st.codes, step, st.lengths, self.delays, cfg.special_token)  # [1, K]
            tokens.append(t.expand(st.rows, -1))
            positions.append(step + torch.tensor(st.offsets, dtype=torch.int64, device=self.device))
            spans.append((row, row + st.rows))
            row += st.rows
        x = dec.embed(torch.cat(tokens)[:, :, None], torch.cat(positions)[:, None])  # [R, 1, D]

        def self_attn(i, q, k, v):
            out = []
            for st, (a, b) in zip(states, spans):
                # rows with equal offsets attend together; two-step CFG's rows each on their own
                groups = [(0, st.rows)] if len(set(st.offsets)) == 1 else [(r, r + 1) for r in range(st.rows)]
                for r0, r1 in groups:
                    s = st.offsets[r0] + st.step
                    st.cache.k[i, r0:r1, :, s : s + 1] = dec._heads(k[a + r0 : a + r1])
                    st.cache.v[i, r0:r1, :, s : s + 1] = dec._heads(v[a + r0 : a + r1])
                    allowed = torch.ones(1, s + 1, dtype=torch.bool, device=self.device)
                    out.append(dec._merge(attention(dec._heads(q[a + r0 : a + r1]), st.cache.k[i, r0:r1, :, : s + 1],
                                                    st.cache.v[i, r0:r1, :, : s + 1], allowed)))
            return torch.cat(out)

        def cross_attn(i, q):
            out = []
            for st, (a, b) in zip(states, spans):
                allowed = st.cross.mask[:, None, None, :]
                out.append(dec._merge(attention(dec._heads(q[a:b]), st.cross.k[i], st.cross.v[i], allowed)))
            return torch.cat(out)

        for i in range(cfg.num_layers):
            x = dec.layer(i, x, self_attn, None if cfg.prefix else cross_attn)
        logits = dec.logits(x)[:, 0]  # [R, K, V]

        bad: dict[int, bool] = {}
        for slot, st, (a, b) in zip(slots, states, spans):
            p = st.params
            if p.cfg_coef_beta is None:
                mixed = cfg_mix(logits[a:b], 1, p.cfg_coef)[0]  # fp32 [K, V]
            else:  # w, the text-dropped logits: the melody-only row, or for text models the null row's
                c, u = logits[a].float(), logits[b - 1].float()
                w = logits[a + 1].float() if st.rows == 3 else u
                mixed = double_cfg_mix(c, w, u, p.cfg_coef, p.cfg_coef_beta)
            bad[slot] = not bool(torch.isfinite(mixed).all())
            step = torch.tensor([st.step], dtype=torch.int64, device=self.device)
            u = uniforms(st.seed, step, cfg.num_codebooks)[0]  # [K]
            picked = sample_tokens(mixed, u, use_sampling=p.use_sampling, temperature=p.temperature,
                                   top_k=p.top_k, top_p=p.top_p)
            pattern.delay_step_write(st.codes, picked[None], step, st.lengths, st.prompt_lengths, self.delays)
            st.step += 1
        return bad
