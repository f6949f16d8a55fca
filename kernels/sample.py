"""Next-token selection: greedy, or softmax + top-k / top-p filter + inverse-CDF draw, one program per row.

Semantics (audiocraft's, as `enginepy.sampling.sample_tokens` defines them), for logits l [N, V] and u [N]:
  * greedy (`use_sampling=False` or temperature 0): argmax of l, first index on ties.
  * otherwise p = softmax(l / temperature) in fp32, then one filter:
      top_p > 0: keep p >= t, t = the smallest p whose mass strictly before it (descending order) is <= top_p;
      elif top_k > 0: keep p >= t, t = the k-th largest p (counting repeats; ties with it are kept);
      else keep everything.
    token = first i (index order) with cumsum(w)[i] > u * sum(w), w = kept p (unnormalised), clamped to
    the last index with w > 0.

Threshold search without sorting: p >= 0, so the order of the fp32 values equals the order of their bit
patterns read as int32, and p <= 1 bounds them by 0x3F800000 < 2**30. Both filters keep {p : bits(p) >= z*}
where z* is the largest z in [0, 2**30) with F(z) > limit, F(z) = sum of weight over {p : bits(p) >= z}:
  top-k: weight 1, limit k - 1/2: z* = the largest z with #{p >= z} >= k, exactly the k-th largest value;
  top-p: weight p, limit top_p: F(z*) > top_p >= F(z* + 1) = the mass strictly above the value z*, i.e. z*
         is the smallest value whose first copy in descending order has mass before it <= top_p, which is
         the smallest kept value of the sorted rule, ties included. (F(0) <= top_p: z* = 0, keep all.)
F is non-increasing, so z* is found digit by digit (a radix search, most significant first): with digits of
DIGIT_BITS bits, each of the 30 / DIGIT_BITS rounds evaluates F at the 2**DIGIT_BITS candidates of the next
digit in one [2**DIGIT_BITS, V] masked reduction over the row held in registers. DIGIT_BITS = 1 is plain
bisection. A sort of the row (bitonic, O(V log^2 V) exchanges) would do more work for the same threshold.
The draw uses one in-register cumulative sum. Probabilities come from one exp, a sum and an IEEE division;
they can differ from torch's softmax in the last bit, so a draw can differ from the reference only when
u * sum(w) falls within float rounding of a CDF step (and top-p only when top_p lies within rounding of a
partial mass): events of probability about 1e-7 per draw.

Every setting is per row (`sample_rows`, with `row_settings` turning greedy / temperature / top_k / top_p tensors
into the kernel's arguments), so one compiled kernel and one CUDA graph serve any mix of requests; "no filter"
is top-k with k = V. `sample` applies one setting to every row.

Shapes and dtypes:
    logits   [N, V], fp32 (fp16 / bf16 are read as fp32), any strides, 1 <= V <= 16384
    u        fp32 [N] in [0, 1) (see `enginepy.rng`: the same numbers in every backend)
    returns  int64 [N]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INTERPRET, check_devices, check_out, check_shape, check_tensor

_MAX_VOCAB = 16384
# Digits of 3 bits: 10 rounds over an [8, V] tile, which fits in registers at V = 2048 with 8 warps.
# The interpreter pays per reduction call rather than per element, so it takes 6-bit digits (5 rounds).
_DIGIT_BITS = 6 if INTERPRET else 3


@triton.jit
def _sample_kernel(
    logits_ptr, u_ptr, out_ptr, greedy_ptr, temperature_ptr, limit_ptr, top_p_ptr,
    stride_l_n, stride_l_v, stride_u, stride_o,
    V,
    DIGIT_BITS: tl.constexpr,
    RADIX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Every setting is read per row, so one compiled kernel (and one captured graph) serves any mix of settings.
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    valid = offs < V
    x = tl.load(logits_ptr + n * stride_l_n + offs * stride_l_v, mask=valid, other=-float("inf")).to(tl.float32)
    greedy = tl.load(greedy_ptr + n) != 0
    if greedy:
        token = tl.argmax(x, axis=0, tie_break_left=True)
    else:
        temperature = tl.load(temperature_ptr + n)
        x = tl.math.div_rn(x, tl.zeros_like(x) + temperature)
        e = tl.where(valid, tl.exp(x - tl.max(x, axis=0)), 0.0)
        p = tl.math.div_rn(e, tl.zeros_like(e) + tl.sum(e, axis=0))
        bits = tl.where(valid, p.to(tl.int32, bitcast=True), -1)  # padding lanes lie below every p >= 0
        # top-p weighs by p; top-k counts (weight 1). "No filter" is top-k with k = V, which keeps every token.
        nucleus = tl.load(top_p_ptr + n) != 0
        weight = tl.where(nucleus, p, tl.where(valid, 1.0, 0.0))
        limit = tl.load(limit_ptr + n)
        digits = tl.arange(0, RADIX)
        z = 0
        for r in tl.static_range(30 // DIGIT_BITS):
            # candidates z + d * 2**shift, d < 2**DIGIT_BITS, stay below 2**31: no overflow
            shift = 30 - DIGIT_BITS * (r + 1)
            cand = z + (digits << shift)
            mass = tl.sum(tl.where(bits[None, :] >= cand[:, None], weight[None, :], 0.0), axis=1)
            d = tl.sum((mass > limit).to(tl.int32), axis=0) - 1
            z = z + (tl.maximum(d, 0) << shift)
        keep = bits >= z
        w = tl.where(keep & valid, p, 0.0)
        cdf = tl.cumsum(w, axis=0)
        target = tl.load(u_ptr + n * stride_u) * tl.max(cdf, axis=0)  # cdf is non-decreasing: max = total
        token = tl.sum(((cdf <= target) & valid).to(tl.int32), axis=0)
        # u * total can round up to total: fall back to the last token with non-zero weight.
        last = tl.max(tl.where(w > 0.0, offs, -1), axis=0)
        token = tl.minimum(token, last)
    tl.store(out_ptr + n * stride_o, token.to(tl.int64))


def row_settings(greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 vocab: int, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-row settings [N] -> the kernel's per-row arguments (pure torch ops: they run inside a CUDA graph).

    greedy bool, temperature fp32 (ignored where greedy), top_k int (0 = off), top_p fp32 (> 0 = nucleus,
    which overrides top_k) -> greedy int8, temperature fp32 (1 where greedy), limit fp32, nucleus int8.
    """
    k = torch.where(top_k > 0, torch.clamp(top_k, max=vocab), torch.full_like(top_k, vocab)).to(torch.float32)
    nucleus = top_p > 0
    settings = dict(
        greedy=greedy.to(torch.int8),
        temperature=torch.where(greedy, torch.ones_like(temperature), temperature).to(torch.float32),
        limit=torch.where(nucleus, top_p.to(torch.float32), k - 0.5),
        nucleus=nucleus.to(torch.int8),
    )
    if out is not None:
        for name, value in settings.items():
            out[name].copy_(value)
        return out
    return settings


def sample_rows(logits: torch.Tensor, u: torch.Tensor, settings: dict[str, torch.Tensor], *,
                out: torch.Tensor | None = None, digit_bits: int | None = None) -> torch.Tensor:
    """One token per row with per-row settings (from `row_settings`). logits [N, V], u fp32 [N] -> int64 [N]."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("u", u, dtypes=(torch.float32,), ndim=1)
    rows, vocab = logits.shape
    check_shape("u", u, (rows,))
    if not 1 <= vocab <= _MAX_VOCAB:
        raise ValueError(f"logits vocabulary size V must be in [1, {_MAX_VOCAB}], got {vocab}")
    for name, dtype in (("greedy", torch.int8), ("temperature", torch.float32), ("limit", torch.float32),
                        ("nucleus", torch.int8)):
        check_tensor(f"settings[{name!r}]", settings.get(name), dtypes=(dtype,), ndim=1)
        check_shape(f"settings[{name!r}]", settings[name], (rows,))
        if not settings[name].is_contiguous():
            raise ValueError(f"settings[{name!r}] must be contiguous")
    device = check_devices(logits=logits, u=u, **settings)
    out = check_out(out, (rows,), torch.int64, device)
    if rows == 0:
        return out
    digit_bits = _DIGIT_BITS if digit_bits is None else int(digit_bits)
    if digit_bits not in (1, 2, 3, 5, 6):
        raise ValueError(f"digit_bits must divide 30 and be at most 6, got {digit_bits}")
    block_v = max(triton.next_power_of_2(vocab), 16)
    _sample_kernel[(rows,)](
        logits, u, out, settings["greedy"], settings["temperature"], settings["limit"], settings["nucleus"],
        logits.stride(0), logits.stride(1), u.stride(0), out.stride(0),
        vocab,
        DIGIT_BITS=digit_bits,
        RADIX=1 << digit_bits,
        BLOCK_V=block_v,
        num_warps=4 if block_v <= 1024 else 8,
    )
    return out


def sample(
    logits: torch.Tensor,
    u: torch.Tensor,
    *,
    use_sampling: bool = True,
    temperature: float = 1.0,
    top_k: int = 250,
    top_p: float = 0.0,
    out: torch.Tensor | None = None,
    digit_bits: int | None = None,
) -> torch.Tensor:
    """One token per row, the same settings for every row. logits [N, V], u fp32 [N] in [0, 1) -> int64 [N].

    digit_bits: width of the radix search digits (1, 2, 3, 5 or 6; default 3 on a GPU, 6 under the
    interpreter). Every width finds the same threshold; it only trades rounds for tile size.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    rows, vocab = logits.shape
    greedy = not use_sampling or temperature == 0.0

    def full(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device=logits.device)

    settings = row_settings(full(greedy, torch.bool), full(float(temperature), torch.float32),
                            full(int(top_k), torch.int64), full(float(top_p), torch.float32), vocab)
    return sample_rows(logits, u, settings, out=out, digit_bits=digit_bits)


def sample_ref(
    logits: torch.Tensor,
    u: torch.Tensor,
    *,
    use_sampling: bool = True,
    temperature: float = 1.0,
    top_k: int = 250,
    top_p: float = 0.0,
    out: torch.Tensor | None = None,
    digit_bits: int | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `sample`, written from the semantics above (sorting instead of the radix search)."""
    x = logits.float()
    if not use_sampling or temperature == 0.0:
        result = x.argmax(dim=-1)
    else:
        p = torch.softmax(x / temperature, dim=-1)
        if top_p > 0.0:
            desc = p.sort(dim=-1, descending=True).values
            mass_before = desc.cumsum(dim=-1) - desc
            # smallest kept value: the last sorted entry whose preceding mass is <= top_p
            n_kept = (mass_before <= top_p).sum(dim=-1, keepdim=True).clamp(min=1)
            keep = p >= desc.gather(-1, n_kept - 1)
        elif top_k > 0:
            kth = p.sort(dim=-1, descending=True).values[:, min(top_k, p.shape[-1]) - 1 : min(top_k, p.shape[-1])]
            keep = p >= kth
        else:
            keep = torch.ones_like(p, dtype=torch.bool)
        w = torch.where(keep, p, torch.zeros_like(p))
        cdf = w.cumsum(dim=-1)
        target = u.float()[:, None] * cdf[:, -1:]
        token = (cdf <= target).sum(dim=-1)
        index = torch.arange(p.shape[-1], device=p.device)
        last = torch.where(w > 0, index, torch.full_like(index, -1)).amax(dim=-1)
        result = torch.minimum(token, last)
    if out is not None:
        out.copy_(result)
        return out
    return result
