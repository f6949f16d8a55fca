"""CPU decode matmuls at memory bandwidth: x @ W.T over weights packed once as bf16 or int8 (csrc/cpu_linear.cpp).

A CPU decode step multiplies 2..32 rows by every weight of the decoder once, so it is bound by reading the
weights; fp32 F.linear already reads them at the copy bandwidth. Fewer bytes per weight read at the same
bandwidth is the only way to a faster step, and torch's bf16/int8 matmuls do not reach the bandwidth at a
few rows. `torch.ops.enginepy.cpu_linear` does:

  y [..., N] = x [..., K] @ W.T (+ bias [N]) -> GELU (exact) if asked -> (+ residual [..., N])

with fp32 accumulation, the epilogue in fp32 and one rounding to x's dtype (fp32 or bf16):
  kind "bf16": W and x rounded to bf16 (vdpbf16ps on AVX512-BF16, fp32 FMAs otherwise).
  kind "int8": W = scale[n] * q[n, k], q in [-127, 127], per-output-channel absmax scales. x is quantized per
               row at call time in x_passes int8 passes (vpdpbusd on AVX512-VNNI, vpmaddwd otherwise):
               2 (default): x ~= sx * xh + (sx / 254) * xl, about 15 bits of the row's absmax, so the error is
                  the weights' rounding alone (int8 weights with bf16-grade activations);
               1: x ~= sx * xh, 8 bits per row (dynamic int8 activations): half the multiplies, for the
                  compute-bound row counts (batch 8 with CFG), at ~1.5x the output error.
Weights are packed once (`pack_weight`) into blocks of 32 output columns that the kernel streams; the blocks
are split across threads. `pack_for_cpu(decoder, kind)` packs every decoder matmul and sets
`decoder.linear_impl`, which `MusicGenDecoder.linear` calls instead of F.linear.

`linear_ref` is the same function in plain torch (fp64), the oracle of the tests.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from enginepy import _C  # noqa: F401  (importing it registers torch.ops.enginepy.*)
except ImportError as exc:
    raise ImportError(
        f"enginepy._C, the C++ extension with the CPU matmul, could not be imported ({exc}). "
        "Build it from the repository root with `make build` or `pip install --no-build-isolation --no-deps -e .`"
    ) from exc

KINDS = ("bf16", "int8")
BLOCK = 32  # output columns per packed block
GROUP = {"bf16": 2, "int8": 4}  # consecutive k per column in one packed group
LOW_STEPS = 254.0  # second int8 activation pass: step sx / 254
# The matmuls of one decoder layer, by weight name (MusicGenDecoder.linear); the heads are packed as [K*V, D].
LAYER_LINEARS = ("qkv", "out", "cross_q", "cross_out", "fc1", "fc2")


@dataclass
class PackedWeight:
    """A weight W [N, K] in the layout the kernel streams.

    packed: bf16 [ceil(N/32), ceil(K/2), 32, 2] (kind bf16) or uint8 [ceil(N/32), ceil(K/4), 32, 4] holding
    q + 128 (kind int8); scale: fp32 [N] per output channel (int8) or None.
    """

    packed: torch.Tensor
    scale: torch.Tensor | None
    out_features: int
    in_features: int
    kind: str

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads from this weight (padding and scales included)."""
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.packed.numel() * self.packed.element_size() + extra

    def clone(self) -> "PackedWeight":
        scale = self.scale.clone() if self.scale is not None else None
        return PackedWeight(self.packed.clone(), scale, self.out_features, self.in_features, self.kind)


def isas(kind: str) -> list[str]:
    """The kernels this CPU runs for `kind`, best first ('auto' picks the first): e.g.
    ['avx512bf16', 'avx512', 'avx2', 'scalar'] for bf16, ['avx512vnni', 'avx512', 'avx2', 'scalar'] for int8."""
    return torch.ops.enginepy.cpu_linear_isas(kind).split(",")


def pack_weight(weight: torch.Tensor, kind: str) -> PackedWeight:
    """W [N, K] (fp32 / bf16 / fp16, CPU) -> PackedWeight of `kind` ('bf16' | 'int8')."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K]; got {getattr(weight, 'shape', type(weight).__name__)}")
    packed, scale = torch.ops.enginepy.cpu_linear_pack(weight, kind)
    return PackedWeight(packed, scale if kind == "int8" else None, weight.shape[0], weight.shape[1], kind)


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, gelu: bool = False, isa: str = "auto",
           x_passes: int = 2) -> torch.Tensor:
    """x [..., K] fp32 | bf16 -> x @ W.T (+ bias [N]) -> GELU if gelu -> (+ residual [..., N]), in x's dtype.

    isa: 'auto' or one of isas(weight.kind) (a slower path, for tests and benchmarks); x_passes: int8
    activation passes, 1 or 2 (see the module docstring; bf16 weights take 2).
    """
    return torch.ops.enginepy.cpu_linear(x, weight.packed, weight.scale, weight.out_features, bias, residual, gelu,
                                         isa, x_passes)


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """The weight the kernel multiplies, unpacked in plain torch: fp32 [N, K] (bf16 values, or q * scale)."""
    blocks, groups, _, group = weight.packed.shape
    values = weight.packed.float() if weight.kind == "bf16" else weight.packed.float() - 128.0
    w = values.permute(0, 2, 1, 3).reshape(blocks * BLOCK, groups * group)[: weight.out_features, : weight.in_features]
    return w * weight.scale[:, None] if weight.kind == "int8" else w.contiguous()


def quantize_rows_ref(x: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """The int8 kernels' view of x [M, K] fp32: sx * xh (+ (sx / 254) * xl) per row, returned in fp64."""
    sx = x.abs().amax(dim=-1, keepdim=True) / 127.0
    t = torch.where(sx > 0, x / sx, torch.zeros_like(x))
    xh = t.round().clamp(-127, 127)
    if passes == 1:
        return sx.double() * xh.double()
    xl = ((t - xh) * LOW_STEPS).round().clamp(-127, 127)
    return sx.double() * xh.double() + (sx / LOW_STEPS).double() * xl.double()


def linear_ref(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, gelu: bool = False, x_passes: int = 2) -> torch.Tensor:
    """`linear` in plain torch: the same roundings of x and W, the sums and the epilogue in fp64."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xq = x2.bfloat16().double() if weight.kind == "bf16" else quantize_rows_ref(x2, x_passes)
    y = xq @ dequantize(weight).double().T
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.reshape(y.shape).double()
    return y.to(x.dtype).view(*x.shape[:-1], weight.out_features)


class PackedLinears:
    """`decoder.linear_impl`: (x, name) -> x @ W[name].T over packed weights, optional fused epilogue."""

    def __init__(self, weights: dict[str, PackedWeight], isa: str = "auto", x_passes: int = 2):
        self.weights = weights
        self.isa = isa
        self.x_passes = x_passes

    def __call__(self, x: torch.Tensor, name: str, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        return linear(x, self.weights[name], bias, residual, gelu, self.isa, self.x_passes)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())


def pack_for_cpu(decoder, kind: str, heads: bool = True, release: bool = True, isa: str = "auto",
                 x_passes: int = 2) -> PackedLinears:
    """Packs every matmul of a decode step and sets decoder.linear_impl; returns it.

    The layer matmuls are `layers.{i}.qkv|out|cross_q|cross_out|fc1|fc2`; with heads=True the heads [K, V, D]
    are packed too, as one [K*V, D] matrix under the name 'heads' (its output [..., K*V] unflattens to [K, V]).
    release=True drops the decoder's own copies of the packed weights (`logits` reads packed heads through
    linear_impl too), so the model is held once; the decoder then needs its linear_impl. Activations keep the decoder's
    dtype (bf16 or fp32); the packing reads the weights as they are loaded (an fp32 load gives the most
    faithful int8 scales). x_passes: int8 activation passes (2: the weights' error only; 1: faster when
    compute-bound, ~1.5x the error).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if decoder.device.type != "cpu":
        raise ValueError(f"pack_for_cpu needs a decoder on the CPU; got {decoder.device}")
    if decoder.linear_impl is not None:
        raise ValueError("the decoder's matmuls are packed already (decoder.linear_impl is set)")
    if isa != "auto" and isa not in isas(kind):
        raise ValueError(f"isa must be 'auto' or one of {', '.join(isas(kind))} on this CPU; got {isa!r}")
    if x_passes not in ((1, 2) if kind == "int8" else (2,)):
        raise ValueError(f"x_passes must be 1 or 2 with int8 weights (2 with bf16 weights); got {x_passes!r}")
    names = [f"layers.{i}.{n}" for i in range(decoder.cfg.num_layers) for n in LAYER_LINEARS]
    weights = {}
    for name in names + (["heads"] if heads else []):
        w = decoder.w(name)
        packed = weights[name] = pack_weight(w.reshape(-1, w.shape[-1]), kind)
        # The packed tensors become buffers of the decoder, so whatever walks its buffers (memory and bandwidth
        # accounting) sees what a step reads.
        key = "cpu_packed__" + name.replace(".", "__")
        decoder.register_buffer(key, packed.packed, persistent=False)
        if packed.scale is not None:
            decoder.register_buffer(key + "__scale", packed.scale, persistent=False)
        if release:
            delattr(decoder, name.replace(".", "__"))  # one by one: the peak is the model plus one matrix
    impl = PackedLinears(weights, isa, x_passes)
    decoder.linear_impl = impl
    return impl


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache as the kernel reports it (sysfs), 32 MiB when it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else 32 * 2**20


# Fake kernels: output metadata only, so the ops trace under torch.compile and FakeTensor.


@torch.library.register_fake("enginepy::cpu_linear_pack")
def _cpu_linear_pack_fake(weight: torch.Tensor, kind: str):
    torch._check(kind in KINDS, lambda: f"kind must be 'bf16' or 'int8', got '{kind}'")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [N, K], got {weight.dim()}-D")
    n, k = weight.shape
    group = GROUP[kind]
    packed = weight.new_empty((-(-n // BLOCK), -(-k // group), BLOCK, group),
                              dtype=torch.bfloat16 if kind == "bf16" else torch.uint8)
    return packed, weight.new_empty((n if kind == "int8" else 0,), dtype=torch.float32)


@torch.library.register_fake("enginepy::cpu_linear")
def _cpu_linear_fake(x, packed, scale, out_features, bias=None, residual=None, gelu=False, isa="auto", x_passes=2):
    torch._check(x.dtype in (torch.float32, torch.bfloat16), lambda: f"x must be float32 or bfloat16, got {x.dtype}")
    torch._check(packed.dim() == 4, lambda: f"packed must be 4-D, got {packed.dim()}-D")
    return x.new_empty((*x.shape[:-1], out_features))


__all__ = ["KINDS", "PackedWeight", "PackedLinears", "isas", "pack_weight", "linear", "linear_ref", "dequantize",
           "pack_for_cpu", "last_level_cache_bytes"]
