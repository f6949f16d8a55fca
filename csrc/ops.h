// Delay-pattern ops of enginepy, registered as torch.ops.enginepy.* in bindings.cpp.
//
// Codebook k is delayed by delays[k] >= 0 steps after one start column of the special token.
// With T frames and D = max(delays), the pattern has S = T + D + 1 columns:
//   pattern[b, k, 0]                 = special
//   pattern[b, k, 1 + t + delays[k]] = codes[b, k, t]      0 <= t < T
//   every other entry                = special
// All tensors are int64. The plain-torch twins live in enginepy/pattern.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace enginepy {

// Whole-sequence ops (outside the decode loop; they may synchronise with the device).

// codes [B, K, T], delays [K] -> pattern [B, K, T + max(delays) + 1].
at::Tensor delay_scatter_cpu(const at::Tensor& codes, const at::Tensor& delays, int64_t special);
// pattern [B, K, S], delays [K] -> codes [B, K, S - 1 - max(delays)].
at::Tensor delay_gather_cpu(const at::Tensor& pattern, const at::Tensor& delays);

// Per-step ops (inside the decode loop and its CUDA graphs: no host synchronisation on CUDA).

// codes [B, K, Tmax], step [B], lengths [B], delays [K] -> tokens [B, K]:
// tokens[b, k] = codes[b, k, t], t = step[b] - 1 - delays[k], where 0 <= t < min(lengths[b], Tmax); else special.
at::Tensor delay_step_input_cpu(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& lengths,
                                const at::Tensor& delays, int64_t special);
// In place: codes[b, k, t] = tokens[b, k], t = step[b] - delays[k],
// where max(prompt_lengths[b], 0) <= t < min(lengths[b], Tmax).
void delay_step_write_cpu(const at::Tensor& codes, const at::Tensor& tokens, const at::Tensor& step,
                          const at::Tensor& lengths, const at::Tensor& prompt_lengths, const at::Tensor& delays);

#ifdef ENGINEPY_WITH_CUDA
at::Tensor delay_scatter_cuda(const at::Tensor& codes, const at::Tensor& delays, int64_t special);
at::Tensor delay_gather_cuda(const at::Tensor& pattern, const at::Tensor& delays);
// The CUDA per-step ops do not check delays >= 0: that needs the values on the host, i.e. a
// synchronisation, which a captured graph cannot do. The whole-sequence ops check it.
at::Tensor delay_step_input_cuda(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& lengths,
                                 const at::Tensor& delays, int64_t special);
void delay_step_write_cuda(const at::Tensor& codes, const at::Tensor& tokens, const at::Tensor& step,
                           const at::Tensor& lengths, const at::Tensor& prompt_lengths, const at::Tensor& delays);
#endif

// Argument checks shared by the CPU and CUDA implementations (defined in delay_pattern.cpp).
// They read shapes, dtypes and devices only, never values, so they are safe inside graph capture.
namespace checks {

// `codes` (called `name` in messages, with the shape label `shape`, e.g. "[B, K, T]") is int64 3-D;
// delays is int64 [K] on the same device.
void codes_and_delays(const at::Tensor& codes, const char* name, const char* shape, const at::Tensor& delays);
// `tensor` int64 [B] on the device of codes.
void per_row(const at::Tensor& tensor, const char* name, const at::Tensor& codes);
// tokens int64 [B, K] on the device of codes.
void tokens(const at::Tensor& tokens, const at::Tensor& codes);
// Reads delays (a CPU tensor) and returns max(delays), 0 when empty; fails if any entry is negative.
int64_t max_delay_on_host(const at::Tensor& delays_cpu);

}  // namespace checks
}  // namespace enginepy
