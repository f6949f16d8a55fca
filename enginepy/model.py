"""The MusicGen decoder in plain PyTorch: the reference backend and the oracle of the fast one.

Pre-LN transformer, no biases in attention, FFN or heads (DESIGN.md §3):
  x = Σ_k emb[k, tok_k] + sinusoid(pos)
  per layer: x += SelfAttn(LN1 x)   causal, over a static preallocated KV cache
             x += CrossAttn(LNc x)  over text K/V computed once per request, masked per row
             x += W2 GELU(W1 LN2 x)
  logits_k = heads[k] · LN_out x
Attention scores and softmax are computed in fp32 whatever the weight dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal position embeddings, cos half first. positions int64 [S] -> fp32 [S, dim].

    f_i = 10000^(-i / (half - 1)); emb = cat([cos(p f), sin(p f)]) (+ one zero column when dim is odd),
    computed in the same order of operations as transformers' MusicgenSinusoidalPositionalEmbedding.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.int64, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


@dataclass
class KVCache:
    """Static self-attention cache, allocated once per request: k, v [L, B, H, S_max, Dh]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


@dataclass
class CrossKV:
    """Cross-attention keys and values of every layer, computed once: k, v [L, B, H, Tt, Dh]; mask bool [B, Tt]."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention in fp32. q [B, H, Sq, Dh], k/v [B, H, Sk, Dh], allowed bool broadcastable to [B, H, Sq, Sk].

    Disallowed scores get the most negative finite value rather than -inf: a row with no allowed key (the
    null-condition rows of CFG) then averages its values, which are exactly zero there, instead of giving NaN.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v.float()).to(q.dtype)


class MusicGenDecoder(torch.nn.Module):
    """The decoder with packed weights (see weights.py). Holds no per-request state."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        for name, tensor in weights.items():
            self.register_buffer(name.replace(".", "__"), tensor, persistent=False)

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    @property
    def dtype(self) -> torch.dtype:
        return self.w("emb").dtype

    @property
    def device(self) -> torch.device:
        return self.w("emb").device

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, H, S, Dh]
        b, s, _ = x.shape
        return x.view(b, s, self.cfg.num_heads, self.cfg.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, S, Dh] -> [B, S, D]
        b, h, s, dh = x.shape
        return x.transpose(1, 2).reshape(b, s, h * dh)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w(name + ".weight"), self.w(name + ".bias"), self.cfg.layer_norm_eps)

    def project_text(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """T5 states fp32 [B, Tt, Dt] -> conditioning [B, Tt, D] in fp32, zero where text_mask is False."""
        proj = F.linear(text_states.float(), self.w("text_proj.weight"), self.w("text_proj.bias"))
        return proj * text_mask[..., None].to(proj.dtype)

    def precompute_cross(self, cond: torch.Tensor, mask: torch.Tensor) -> CrossKV:
        """Cross-attention K/V of every layer from the conditioning [B, Tt, D], once per request."""
        cond = cond.to(self.dtype)
        ks, vs = [], []
        for i in range(self.cfg.num_layers):
            k, v = F.linear(cond, self.w(f"layers.{i}.cross_kv")).chunk(2, dim=-1)
            ks.append(self._heads(k))
            vs.append(self._heads(v))
        return CrossKV(torch.stack(ks), torch.stack(vs), mask.bool())

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens int64 [B, K, S] at positions start .. start+S-1 -> x [B, S, D]."""
        emb = self.w("emb")
        x = emb[0][tokens[:, 0]]
        for k in range(1, tokens.shape[1]):
            x = x + emb[k][tokens[:, k]]
        positions = torch.arange(start, start + tokens.shape[2], device=tokens.device)
        return x + sinusoid(positions, self.cfg.hidden_size).to(x.dtype)

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """Run S steps at positions start .. start+S-1, writing their K/V into the cache.

        tokens int64 [B, K, S] -> logits [B, K, S, V] in the weight dtype.
        """
        b, _, s = tokens.shape
        end = start + s
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} is beyond the KV cache ({cache.max_len} positions)")
        x = self.embed(tokens, start)
        q_pos = torch.arange(start, end, device=tokens.device)
        causal = torch.arange(end, device=tokens.device)[None, :] <= q_pos[:, None]  # [S, end]
        cross_allowed = cross.mask[:, None, None, :]  # [B, 1, 1, Tt]
        for i in range(self.cfg.num_layers):
            p = f"layers.{i}."
            q, k, v = F.linear(self._ln(x, p + "ln1"), self.w(p + "qkv")).chunk(3, dim=-1)
            cache.k[i, :, :, start:end] = self._heads(k)
            cache.v[i, :, :, start:end] = self._heads(v)
            h = attention(self._heads(q), cache.k[i, :, :, :end], cache.v[i, :, :, :end], causal)
            x = x + F.linear(self._merge(h), self.w(p + "out"))

            q = F.linear(self._ln(x, p + "ln_cross"), self.w(p + "cross_q"))
            h = attention(self._heads(q), cross.k[i], cross.v[i], cross_allowed)
            x = x + F.linear(self._merge(h), self.w(p + "cross_out"))

            h = F.gelu(F.linear(self._ln(x, p + "ln2"), self.w(p + "fc1")))
            x = x + F.linear(h, self.w(p + "fc2"))
        x = self._ln(x, "ln_out")
        return torch.einsum("bsd,kvd->bksv", x, self.w("heads"))
