"""The single dispatch point of the fast path: which implementation computes each op.

  Triton (enginepy.kernels)   embedding, paged KV write, paged attention, cross-attention, CFG mix, sampling
                              on CUDA, or on CPU when TRITON_INTERPRET=1 was exported before import
  C++    (enginepy._C)        delay-pattern step ops (per-row step input and write), when the extension is built
  torch                       LayerNorm, matmuls, GELU; the delay step ops when the extension is absent

The fast decoder calls only this module, never a kernel directly.
"""
from __future__ import annotations

import functools
import os

import torch

from . import pattern


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors only under the interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _kernels():
    from .kernels import cfg_mix, cross_attention, embedding, paged_attention, paged_kv_write, sample

    return dict(cfg_mix=cfg_mix, cross_attention=cross_attention, embedding=embedding,
                paged_attention=paged_attention, paged_kv_write=paged_kv_write, sample=sample)


@functools.lru_cache(maxsize=None)
def delay_ops_backend() -> str:
    """'cpp' when enginepy._C is built and loads, else 'torch'."""
    try:
        from . import delay_ops  # noqa: F401  (registers the ops and their shape stubs)
    except ImportError:
        return "torch"
    return "cpp"


def embedding(tokens, table, positions, out=None):
    """Σ_k table[k, tokens[:, k]] + sinusoid(positions): tokens [R, K], table [K, V+1, D] -> [R, D]."""
    return _kernels()["embedding"].embedding(tokens, table, positions, out=out)


def kv_write(k, v, k_cache, v_cache, block_tables, positions):
    """Write one step's k, v [R, H, Dh] into the paged pools at each row's position, in place."""
    _kernels()["paged_kv_write"].paged_kv_write(k, v, k_cache, v_cache, block_tables, positions)


def self_attention(q, k_cache, v_cache, block_tables, seq_lens, out=None):
    """q [R, H, Dh] over each row's first seq_lens[r] cached positions -> [R, H, Dh]."""
    return _kernels()["paged_attention"].paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, out=out)


def cross_attention(q, k, v, mask, out=None):
    """q [R, H, Dh] over text k, v [R, Tt, H, Dh] where mask [R, Tt] is set (no valid key -> zeros)."""
    return _kernels()["cross_attention"].cross_attention(q, k, v, mask=mask, out=out)


def cfg_mix(logits, cfg_coef, temperature, out=None):
    """[2B, K, V] (cond rows, then null rows) -> fp32 [B, K, V], divided by temperature when it is > 0."""
    return _kernels()["cfg_mix"].cfg_mix(logits, cfg_coef, temperature, out=out)


def sample(logits, u, *, use_sampling, temperature, top_k, top_p, out=None):
    """One token per row of fp32 logits [N, V] with caller-supplied uniforms u [N] -> int64 [N]."""
    return _kernels()["sample"].sample(logits, u, use_sampling=use_sampling, temperature=temperature,
                                       top_k=top_k, top_p=top_p, out=out)


def delay_step_input(codes, step, lengths, delays, special):
    """Next input tokens [B, K] from natural-layout codes (see pattern.delay_step_input)."""
    if delay_ops_backend() == "cpp":
        return torch.ops.enginepy.delay_step_input(codes, step, lengths, delays, special)
    return pattern.delay_step_input(codes, step, lengths, delays, special)


def delay_step_write(codes, tokens, step, lengths, prompt_lengths, delays):
    """Write a step's tokens [B, K] into natural-layout codes, in place (see pattern.delay_step_write)."""
    if delay_ops_backend() == "cpp":
        torch.ops.enginepy.delay_step_write(codes, tokens, step, lengths, prompt_lengths, delays)
    else:
        pattern.delay_step_write(codes, tokens, step, lengths, prompt_lengths, delays)
