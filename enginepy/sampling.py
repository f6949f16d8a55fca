"""Next-token selection with audiocraft's semantics, in plain torch (the reference).

Given mixed logits l [N, V] (fp32) and one uniform number u [N] per row:
  * greedy (`use_sampling=False` or temperature 0): argmax of l (first index on ties).
  * otherwise p = softmax(l / temperature), then exactly one filter:
      top_p > 0: nucleus. Sorted descending, a token is kept when the mass strictly before it is <= top_p
                 (the token that crosses top_p is kept); tokens tied with the smallest kept one are kept too.
      elif top_k > 0: the k largest, with every token tied with the k-th value kept (audiocraft's `>=`).
      else: all tokens.
    The draw is an inverse CDF in index order over the kept, unnormalised probabilities w:
      token = first i with cumsum(w)[i] > u * sum(w).
    Using the caller's u (see `enginepy.rng`) instead of a generator makes the draw identical in every
    backend and independent of batch neighbours.
"""
from __future__ import annotations

import torch


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the probabilities that top-p (or, when top_p == 0, top-k) removes. probs [N, V] fp32."""
    if top_p > 0.0:
        sorted_p, _ = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        kept_sorted = before <= top_p
        threshold = torch.where(kept_sorted, sorted_p, torch.full_like(sorted_p, float("inf"))).amin(-1, keepdim=True)
        return probs * (probs >= threshold)
    if top_k > 0:
        k = min(int(top_k), probs.shape[-1])
        threshold = probs.topk(k, dim=-1).values[..., -1:]
        return probs * (probs >= threshold)
    return probs


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw in index order. weights [N, V] >= 0 (unnormalised), u [N] in [0, 1) -> int64 [N]."""
    cdf = weights.cumsum(dim=-1)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    idx = (cdf <= target).sum(dim=-1)
    # u * total can round up to total; then fall back to the last token with non-zero weight.
    last = weights.shape[-1] - 1 - (weights > 0).flip(-1).to(torch.int64).argmax(dim=-1)
    return torch.minimum(idx, last)


def sample_tokens(
    logits: torch.Tensor,
    u: torch.Tensor,
    *,
    use_sampling: bool = True,
    temperature: float = 1.0,
    top_k: int = 250,
    top_p: float = 0.0,
) -> torch.Tensor:
    """Pick one token per row. logits [N, V] (any float dtype, computed in fp32), u [N] -> int64 [N]."""
    logits = logits.float()
    if not use_sampling or temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return draw(filter_probs(probs, top_k, top_p), u)


def cfg_mix(logits: torch.Tensor, batch: int, cfg_coef: float) -> torch.Tensor:
    """Classifier-free guidance on raw logits: [2B, K, V] (cond rows, then null rows) -> fp32 [B, K, V].

    l = l_u + cfg * (l_c - l_u). When the null rows were skipped (logits has B rows), returns the cond logits.
    """
    logits = logits.float()
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + cfg_coef * (cond - uncond)
