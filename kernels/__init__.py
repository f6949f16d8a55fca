"""Triton kernels of enginepy, one op per module, each with its plain-torch `*_ref` twin.

Modules (import the module, e.g. `from enginepy.kernels import embedding`, then call `embedding.embedding`):

  embedding         fused multi-codebook token embedding + sinusoidal position
  paged_kv_write    write new K/V steps into the paged KV cache
  paged_attention   decode attention over a paged KV cache (one query per row): self-attention over the
                    decode cache, cross-attention over the prompt's K/V paged the same way
  paged_prefill     causal self-attention of many queries per row over the paged KV cache
  cfg_mix           classifier-free guidance mix of cond/null logits, with temperature
  sample            greedy / top-k / top-p sampling with caller-supplied uniforms

On a machine without CUDA the kernels run under the Triton interpreter, which only takes effect when
`TRITON_INTERPRET=1` is exported before triton or these modules are imported.
This package never imports the engine (`enginepy.*` modules outside `enginepy.kernels`).
"""

__all__ = [
    "cfg_mix",
    "embedding",
    "paged_attention",
    "paged_kv_write",
    "paged_prefill",
    "sample",
]
