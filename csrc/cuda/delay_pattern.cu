// CUDA delay-pattern ops. Layout and semantics: see ops.h; argument checks: delay_pattern.cpp.
//
// The per-step ops run inside captured CUDA graphs, so they read no device value on the host and
// launch on the current stream. They also skip the delays >= 0 check (it would need those values on
// the host); their bounds checks keep every read and write in memory whatever the delays are.
// The whole-sequence ops copy delays to the host once: they need max(delays) for the output size.
// Only c10/cuda headers are used (c10::cuda::getCurrentCUDAStream is what at::cuda re-exports): they
// need no CUDA math-library headers, so the file builds with a bare CUDA compiler toolkit.
#include "../ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace enginepy {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size with at most this many blocks.
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// A read-only int64 vector seen through its stride, so strided per-row inputs need no copy.
struct Strided1d {
  const int64_t* data;
  int64_t stride;
  __device__ int64_t operator[](int64_t i) const { return data[i * stride]; }
};

Strided1d strided1d(const at::Tensor& t) { return {t.const_data_ptr<int64_t>(), t.stride(0)}; }

// pattern [rows = B*K, S] from contiguous codes [rows, T].
__global__ void delay_scatter_kernel(const int64_t* __restrict__ codes, const int64_t* __restrict__ delays,
                                     int64_t* __restrict__ pattern, int64_t rows, int64_t num_codebooks,
                                     int64_t frames, int64_t steps, int64_t special) {
  const int64_t n = rows * steps;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = i / steps;
    const int64_t t = i - row * steps - 1 - delays[row % num_codebooks];
    pattern[i] = (t >= 0 && t < frames) ? codes[row * frames + t] : special;
  }
}

// codes [rows = B*K, T] from contiguous pattern [rows, S].
__global__ void delay_gather_kernel(const int64_t* __restrict__ pattern, const int64_t* __restrict__ delays,
                                    int64_t* __restrict__ codes, int64_t rows, int64_t num_codebooks,
                                    int64_t frames, int64_t steps) {
  const int64_t n = rows * frames;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = i / frames;
    const int64_t t = i - row * frames;
    codes[i] = pattern[row * steps + 1 + t + delays[row % num_codebooks]];
  }
}

// tokens [B, K] (contiguous) read from codes [B, K, Tmax] through its strides.
__global__ void delay_step_input_kernel(const int64_t* __restrict__ codes, int64_t stride_b, int64_t stride_k,
                                        int64_t stride_t, Strided1d step, Strided1d lengths, Strided1d delays,
                                        int64_t* __restrict__ tokens, int64_t batch, int64_t num_codebooks,
                                        int64_t max_frames, int64_t special) {
  const int64_t n = batch * num_codebooks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / num_codebooks;
    const int64_t k = i - b * num_codebooks;
    const int64_t t = step[b] - 1 - delays[k];
    const int64_t end = min(lengths[b], max_frames);
    tokens[i] = (t >= 0 && t < end) ? codes[b * stride_b + k * stride_k + t * stride_t] : special;
  }
}

// codes [B, K, Tmax] written in place through its strides from tokens [B, K].
__global__ void delay_step_write_kernel(int64_t* __restrict__ codes, int64_t stride_b, int64_t stride_k,
                                        int64_t stride_t, const int64_t* __restrict__ tokens, int64_t tokens_stride_b,
                                        int64_t tokens_stride_k, Strided1d step, Strided1d lengths,
                                        Strided1d prompt_lengths, Strided1d delays, int64_t batch,
                                        int64_t num_codebooks, int64_t max_frames) {
  const int64_t n = batch * num_codebooks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / num_codebooks;
    const int64_t k = i - b * num_codebooks;
    const int64_t t = step[b] - delays[k];
    const int64_t begin = max(prompt_lengths[b], int64_t{0});
    const int64_t end = min(lengths[b], max_frames);
    if (t >= begin && t < end) {
      codes[b * stride_b + k * stride_k + t * stride_t] = tokens[b * tokens_stride_b + k * tokens_stride_k];
    }
  }
}

void check_cuda(const at::Tensor& codes, const char* name) {
  ENGINEPY_CHECK(codes.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", codes.device());
}

}  // namespace

at::Tensor delay_scatter_cuda(const at::Tensor& codes_in, const at::Tensor& delays_in, int64_t special) {
  checks::codes_and_delays(codes_in, "codes", "[B, K, T]", delays_in);
  check_cuda(codes_in, "codes");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor delays = delays_in.contiguous();
  const int64_t max_delay = checks::max_delay_on_host(delays.cpu());
  const int64_t rows = codes.size(0) * codes.size(1);
  const int64_t frames = codes.size(2);
  const int64_t steps = frames + max_delay + 1;
  at::Tensor pattern = at::empty({codes.size(0), codes.size(1), steps}, codes.options());  // [B, K, S]
  if (pattern.numel() == 0) {
    return pattern;
  }
  delay_scatter_kernel<<<blocks_for(pattern.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.const_data_ptr<int64_t>(), delays.const_data_ptr<int64_t>(), pattern.mutable_data_ptr<int64_t>(), rows,
      codes.size(1), frames, steps, special);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pattern;
}

at::Tensor delay_gather_cuda(const at::Tensor& pattern_in, const at::Tensor& delays_in) {
  checks::codes_and_delays(pattern_in, "pattern", "[B, K, S]", delays_in);
  check_cuda(pattern_in, "pattern");
  const c10::cuda::CUDAGuard guard(pattern_in.device());
  const at::Tensor pattern = pattern_in.contiguous();
  const at::Tensor delays = delays_in.contiguous();
  const int64_t max_delay = checks::max_delay_on_host(delays.cpu());
  const int64_t steps = pattern.size(2);
  const int64_t frames = steps - 1 - max_delay;
  ENGINEPY_CHECK(frames >= 0, "pattern has S = ", steps, " steps but delays need at least max(delays) + 1 = ",
                 max_delay + 1);
  at::Tensor codes = at::empty({pattern.size(0), pattern.size(1), frames}, pattern.options());  // [B, K, T]
  if (codes.numel() == 0) {
    return codes;
  }
  delay_gather_kernel<<<blocks_for(codes.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      pattern.const_data_ptr<int64_t>(), delays.const_data_ptr<int64_t>(), codes.mutable_data_ptr<int64_t>(),
      pattern.size(0) * pattern.size(1), pattern.size(1), frames, steps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

at::Tensor delay_step_input_cuda(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& lengths,
                                 const at::Tensor& delays, int64_t special) {
  checks::codes_and_delays(codes, "codes", "[B, K, Tmax]", delays);
  checks::per_row(step, "step", codes);
  checks::per_row(lengths, "lengths", codes);
  check_cuda(codes, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t batch = codes.size(0);
  const int64_t num_codebooks = codes.size(1);
  at::Tensor tokens = at::empty({batch, num_codebooks}, codes.options());  // [B, K]
  if (tokens.numel() == 0) {
    return tokens;
  }
  delay_step_input_kernel<<<blocks_for(tokens.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.const_data_ptr<int64_t>(), codes.stride(0), codes.stride(1), codes.stride(2), strided1d(step),
      strided1d(lengths), strided1d(delays), tokens.mutable_data_ptr<int64_t>(), batch, num_codebooks, codes.size(2),
      special);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tokens;
}

void delay_step_write_cuda(const at::Tensor& codes, const at::Tensor& tokens, const at::Tensor& step,
                           const at::Tensor& lengths, const at::Tensor& prompt_lengths, const at::Tensor& delays) {
  checks::codes_and_delays(codes, "codes", "[B, K, Tmax]", delays);
  checks::tokens(tokens, codes);
  checks::per_row(step, "step", codes);
  checks::per_row(lengths, "lengths", codes);
  checks::per_row(prompt_lengths, "prompt_lengths", codes);
  check_cuda(codes, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n = codes.size(0) * codes.size(1);
  if (n == 0 || codes.size(2) == 0) {
    return;
  }
  delay_step_write_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.mutable_data_ptr<int64_t>(), codes.stride(0), codes.stride(1), codes.stride(2),
      tokens.const_data_ptr<int64_t>(), tokens.stride(0), tokens.stride(1), strided1d(step), strided1d(lengths),
      strided1d(prompt_lengths), strided1d(delays), codes.size(0), codes.size(1), codes.size(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace enginepy
