// Skinny GEMM for CPU decode steps, registered as torch.ops.enginepy.cpu_linear* in bindings.cpp.
//
//   y[m, n] = epilogue( sum_k x[m, k] * W[n, k] )      x [M, K] (M small: 2..32 rows), W [N, K]
//
// A decode step reads every weight once and multiplies it by a handful of rows, so the kernels stream W
// from memory in a pre-packed layout at memory bandwidth and keep all M rows of the tile in registers.
// Two weight formats, both with fp32 accumulation:
//   bf16: W rounded to bf16; x rounded to bf16; products exact, sums in fp32.
//   int8: W = scale[n] * q[n, k], q in [-127, 127] (per-output-channel absmax scale). x is quantized per row
//         at call time in x_passes int8 passes: two, x ~= sx * (xh + xl / 254) (about 15 bits of the row's
//         absmax: the error is the weights' own rounding), or one, x ~= sx * xh (8 bits, half the multiplies:
//         for compute-bound row counts). Products and sums are exact int32.
// Packed layout (both formats), blocks of 32 output columns, each block one contiguous stream:
//   bf16  bf16  [ceil(N/32), ceil(K/2), 32, 2]   packed[b, p, j, e] = W[32b + j, 2p + e]
//   int8  uint8 [ceil(N/32), ceil(K/4), 32, 4]   packed[b, p, j, e] = q[32b + j, 4p + e] + 128
// Padding is zero (128 for uint8). One 64-byte vector then holds 16 columns x (2 bf16 | 4 int8) of
// consecutive k, the operand shape of vdpbf16ps (AVX512-BF16) and vpdpbusd (AVX512-VNNI).
// Kernels per ISA, chosen at run time (one binary for every x86-64; a plain C++ path elsewhere):
//   bf16: avx512bf16 (vdpbf16ps) > avx512 (widen to fp32, FMA) > avx2 (the same on 8 lanes) > scalar
//   int8: avx512vnni (vpdpbusd)  > avx512 (widen to int16, vpmaddwd) > avx2 > scalar
// Every ISA computes the same integer sums for int8 and the same products for bf16.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace enginepy {

// weight [N, K] (fp32 / bf16 / fp16) and kind "bf16" | "int8" -> (packed, scale): scale fp32 [N] for int8,
// an empty fp32 tensor for bf16.
std::tuple<at::Tensor, at::Tensor> cpu_linear_pack(const at::Tensor& weight, std::string_view kind);

// x [..., K] fp32 or bf16 -> y [..., N] in x's dtype, N = out_features.
//   y = x @ W.T (+ bias [N]) then GELU (exact erf) if gelu, then + residual [..., N] (x's dtype).
// The epilogue runs in fp32 and rounds once. isa: "auto" or one of cpu_linear_isas(kind). x_passes: int8
// activation passes, 1 or 2 (bf16 weights: 2).
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                      int64_t out_features, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, bool gelu, std::string_view isa, int64_t x_passes);

// The ISAs this CPU runs for kind "bf16" | "int8", best first, comma-separated (always ends in "scalar").
std::string cpu_linear_isas(std::string_view kind);

}  // namespace enginepy
