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
        self.linear_impl = None

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

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [..., in] @ W[name].T -> [..., out]. `linear_impl(x, name)` replaces F.linear when set (packed CPU
        weights); every matmul of a decode step goes through here, whichever backend runs the attention."""
        if self.linear_impl is not None:
            return self.linear_impl(x, name)
        return F.linear(x, self.w(name))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens int64 [R, K, S] at positions int64 [R, S] -> x [R, S, D] in the weight dtype.

        The K embeddings and the position are summed in fp32, in codebook order, and rounded once, as the
        fused embedding kernel does: the better function, and the same one in both backends.
        """
        emb = self.w("emb")
        x = emb[0][tokens[:, 0]].float()
        for k in range(1, tokens.shape[1]):
            x = x + emb[k][tokens[:, k]].float()
        pos = sinusoid(positions.reshape(-1), self.cfg.hidden_size).view(*positions.shape, -1)
        return (x + pos).to(self.dtype)

    def layer(self, i: int, x: torch.Tensor, self_attn, cross_attn) -> torch.Tensor:
        """One decoder layer on x [..., D]; the attention is injected so every backend shares this math.

        self_attn(i, q, k, v) gets this step's projections [..., D] each (it caches k, v) and returns [..., D];
        cross_attn(i, q) returns [..., D].
        """
        p = f"layers.{i}."
        q, k, v = self.linear(self._ln(x, p + "ln1"), p + "qkv").chunk(3, dim=-1)
        x = x + self.linear(self_attn(i, q, k, v), p + "out")
        q = self.linear(self._ln(x, p + "ln_cross"), p + "cross_q")
        x = x + self.linear(cross_attn(i, q), p + "cross_out")
        h = F.gelu(self.linear(self._ln(x, p + "ln2"), p + "fc1"))
        return x + self.linear(h, p + "fc2")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> logits [..., K, V] in the weight dtype (final LayerNorm, then one head per codebook)."""
        return torch.einsum("...d,kvd->...kv", self._ln(x, "ln_out"), self.w("heads"))

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """Run S steps of every row at positions start .. start+S-1, writing their K/V into the cache (teacher
        forcing and prefill). tokens int64 [B, K, S] -> logits [B, K, S, V] in the weight dtype.
        """
        return self.logits(self.prefill(tokens, start, cache, cross)).permute(0, 2, 1, 3)

    def prefill(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """`forward` without the heads: tokens int64 [B, K, S] -> hidden states [B, S, D] (before the final
        LayerNorm); the K/V of positions start .. start+S-1 are written into the cache."""
        b, _, s = tokens.shape
        end = start + s
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} is beyond the KV cache ({cache.max_len} positions)")
        positions = torch.arange(start, end, device=tokens.device)
        x = self.embed(tokens, positions.expand(b, s))
        causal = torch.arange(end, device=tokens.device)[None, :] <= positions[:, None]  # [S, end]

        def self_attn(i, q, k, v):
            cache.k[i, :, :, start:end] = self._heads(k)
            cache.v[i, :, :, start:end] = self._heads(v)
            return self._merge(attention(self._heads(q), cache.k[i, :, :, :end], cache.v[i, :, :, :end], causal))

        def cross_attn(i, q):
            return self._merge(attention(self._heads(q), cross.k[i], cross.v[i], cross.mask[:, None, None, :]))

        for i in range(self.cfg.num_layers):
            x = self.layer(i, x, self_attn, cross_attn)
        return x
