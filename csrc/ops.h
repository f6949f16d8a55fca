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
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace enginepy {

// Error messages of enginepy's ops are built from strings and std::to_string only, never through an
// ostream, and raised with c10::detail::torchCheckFail (what TORCH_CHECK calls once it has its message).
// TORCH_CHECK itself formats its arguments with a std::ostringstream made in this library (even a single
// std::string goes through one). When the library carries its own copy of libstdc++'s stream code (a
// static libstdc++ in the link) and exports it, the process's libstdc++.so.6 interposes part of that copy,
// the two number locale facets differently, and printing an integer fetches the wrong facet: the integers
// vanish from the message (reproduced on a CPU build linked with -static-libstdc++), or a SIGSEGV in
// codecvt<char16_t>::do_unshift (seen in a CUDA build). setup.py and CMake link with --exclude-libs,ALL,
// which keeps such a copy private and self-consistent, and tests/test_build.py checks the built library;
// the messages depend on neither.
namespace message {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, int64_t value) { out += std::to_string(value); }
inline void append(std::string& out, at::ScalarType dtype) { out += c10::toString(dtype); }
// Device::str() is compiled into libc10, whose stream code is the process's own.
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }
inline void append(std::string& out, at::IntArrayRef sizes) {
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  out += ']';
}

// The pieces concatenated: join("delays[", k, "] = ", value) == "delays[2] = -1".
template <typename... Pieces>
std::string join(const Pieces&... pieces) {
  std::string out;
  (append(out, pieces), ...);
  return out;
}

}  // namespace message

// TORCH_CHECK(cond, pieces...) with the message built by message::join: a c10::Error (RuntimeError in
// Python) whose message is the joined pieces.
#define ENGINEPY_CHECK(cond, ...)                                                                  \
  do {                                                                                             \
    if (C10_UNLIKELY(!(cond))) {                                                                   \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),           \
                                    ::enginepy::message::join(__VA_ARGS__));                       \
    }                                                                                              \
  } while (false)

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
