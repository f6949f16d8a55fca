"""The single dispatch point of the fast path: which implementation computes each op.

  Triton (enginepy.kernels)   embedding, paged KV write, paged attention (self- and cross-attention), CFG mix,
                              sampling
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
    from .kernels import cfg_mix, embedding, paged_attention, paged_kv_write, sample

    return dict(cfg_mix=cfg_mix, embedding=embedding, paged_attention=paged_attention,
                paged_kv_write=paged_kv_write, sample=sample)


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


def kv_write(k, v, k_cache, v_cache, block_tables, positions, lengths=None):
    """Write k, v [R, H, Dh] (one step) or [R, T, H, Dh] (T steps, lengths[r] of them) into the paged pools at
    each row's position, in place; rows with a negative position write nothing."""
    _kernels()["paged_kv_write"].paged_kv_write(k, v, k_cache, v_cache, block_tables, positions, lengths)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, out=None):
    """q [R, H, Dh] over each row's first seq_lens[r] cached positions -> [R, H, Dh] (a row with none -> zeros).
    Serves self-attention (the decode cache) and cross-attention (the text K/V, paged the same way)."""
    return _kernels()["paged_attention"].paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, out=out)


def cfg_mix_rows(logits, cond_rows, null_rows, cfg_coef, temperature, out=None):
    """Per-request CFG mix: logits [R, K, V] -> fp32 [S, K, V] (see kernels/cfg_mix.py)."""
    return _kernels()["cfg_mix"].cfg_mix_rows(logits, cond_rows, null_rows, cfg_coef, temperature, out=out)


def sample_settings(greedy, temperature, top_k, top_p, vocab, out=None):
    """Per-row sampler settings [N] -> the sampling kernel's per-row arguments."""
    return _kernels()["sample"].row_settings(greedy, temperature, top_k, top_p, vocab, out=out)


def sample_rows(logits, u, settings, out=None):
    """One token per row of fp32 logits [N, V] with uniforms u [N] and per-row settings -> int64 [N]."""
    return _kernels()["sample"].sample_rows(logits, u, settings, out=out)


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
