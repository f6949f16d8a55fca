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

    def project_prefix(self, chroma: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """MusicGen-Melody's conditioning prefix, as transformers builds it for generate:
        chroma fp32 [B, Nc, num_chroma] -> audio_proj -> repeated to >= chroma_length frames and cut there; text as
        project_text (zero where masked); -> fp32 [B, chroma_length + Tt, D] = [audio ; text]."""
        audio = F.linear(chroma.float(), self.w("audio_proj.weight"), self.w("audio_proj.bias"))
        n = self.cfg.chroma_length
        if audio.shape[1] < n:
            audio = audio.repeat(1, math.ceil(n / audio.shape[1]), 1)
        return torch.cat([audio[:, :n], self.project_text(text_states, text_mask)], dim=1)

    def embed_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prefix states fp32 [B, P, D] -> decoder inputs [B, P, D] at positions 0 .. P-1, in the weight dtype."""
        pos = sinusoid(torch.arange(prefix.shape[1], device=prefix.device), self.cfg.hidden_size)
        return (prefix.float() + pos).to(self.dtype)

    def precompute_cross(self, cond: torch.Tensor, mask: torch.Tensor) -> CrossKV:
        """Cross-attention K/V of every layer from the conditioning [B, Tt, D], once per request."""
        cond = cond.to(self.dtype)
        ks, vs = [], []
        for i in range(self.cfg.num_layers):
            k, v = F.linear(cond, self.w(f"layers.{i}.cross_kv")).chunk(2, dim=-1)
            ks.append(self._heads(k))
            vs.append(self._heads(v))
        return CrossKV(torch.stack(ks), torch.stack(vs), mask.bool())

    def linear(self, x: torch.Tensor, name: str, residual: torch.Tensor | None = None,
               gelu: bool = False) -> torch.Tensor:
        """x [..., in] @ W[name].T -> GELU if asked -> + residual [..., out]. `linear_impl(x, name, residual,
        gelu)` replaces F.linear when set (packed CPU weights, the epilogue fused in fp32 with one rounding);
        every matmul of a decode step goes through here, whichever backend runs the attention."""
        if self.linear_impl is not None:
            return self.linear_impl(x, name, residual=residual, gelu=gelu)
        y = F.linear(x, self.w(name))
        if gelu:
            y = F.gelu(y)
        return y if residual is None else residual + y

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
        cross_attn(i, q) returns [..., D], or is None for prefix-conditioned models (no cross-attention).
        """
        p = f"layers.{i}."
        q, k, v = self.linear(self._ln(x, p + "ln1"), p + "qkv").chunk(3, dim=-1)
        x = self.linear(self_attn(i, q, k, v), p + "out", residual=x)
        if cross_attn is not None:  # None: a prefix-conditioned model (MusicGen-Melody) has no cross-attention
            q = self.linear(self._ln(x, p + "ln_cross"), p + "cross_q")
            x = self.linear(cross_attn(i, q), p + "cross_out", residual=x)
        h = self.linear(self._ln(x, p + "ln2"), p + "fc1", gelu=True)
        return self.linear(h, p + "fc2", residual=x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> logits [..., K, V] in the weight dtype (final LayerNorm, then one head per codebook).
        With packed CPU weights holding 'heads' ([K*V, D]), the heads are one matmul through linear_impl."""
        h = self._ln(x, "ln_out")
        if self.linear_impl is not None and "heads" in self.linear_impl.weights:
            return self.linear_impl(h, "heads").unflatten(-1, (self.cfg.num_codebooks, self.cfg.vocab_size))
        return torch.einsum("...d,kvd->...kv", h, self.w("heads"))

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV | None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Run S steps of every row at positions start .. start+S-1 (after the prefix, if one is given: see
        prefill), writing their K/V into the cache (teacher forcing and prefill).
        tokens int64 [B, K, S] -> logits [B, K, S, V] in the weight dtype.
        """
        return self.logits(self.prefill(tokens, start, cache, cross, prefix)).permute(0, 2, 1, 3)

    def prefill(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV | None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without the heads: tokens int64 [B, K, S] -> hidden states [B, S, D] (before the final
        LayerNorm); the K/V of positions start .. start+S-1 are written into the cache.

        prefix (MusicGen-Melody, start 0): embedded prefix [B, P, D] (embed_prefix) run before the tokens in the same
        forward, at positions 0 .. P-1, the tokens at P .. P+S-1; returns the tokens' states only. cross is None then.
        """
        b, _, s = tokens.shape
        p = 0 if prefix is None else prefix.shape[1]
        end = start + p + s
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} is beyond the KV cache ({cache.max_len} positions)")
        positions = torch.arange(start, end, device=tokens.device)
        if prefix is None:
            x = self.embed(tokens, positions.expand(b, s))
        else:
            x = torch.cat([prefix, self.embed(tokens, positions[p:].expand(b, s))], dim=1) if s else prefix
        causal = torch.arange(end, device=tokens.device)[None, :] <= positions[:, None]  # [P + S, end]

        def self_attn(i, q, k, v):
            cache.k[i, :, :, start:end] = self._heads(k)
            cache.v[i, :, :, start:end] = self._heads(v)
            return self._merge(attention(self._heads(q), cache.k[i, :, :, :end], cache.v[i, :, :, :end], causal))

        def cross_attn(i, q):
            return self._merge(attention(self._heads(q), cross.k[i], cross.v[i], cross.mask[:, None, None, :]))

        for i in range(self.cfg.num_layers):
            x = self.layer(i, x, self_attn, None if cross is None else cross_attn)
        return x[:, p:]
