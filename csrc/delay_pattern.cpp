// CPU delay-pattern ops and the argument checks shared with the CUDA ones. Layout: see ops.h.
#include "ops.h"

#include <ATen/ops/empty.h>

#include <algorithm>

namespace enginepy {
namespace checks {
namespace {

void int64_dtype(const at::Tensor& tensor, const char* name) {
  ENGINEPY_CHECK(tensor.scalar_type() == at::kLong, name, " must be int64, got ", tensor.scalar_type());
}

void same_device(const at::Tensor& tensor, const char* name, const at::Tensor& codes, const char* codes_name) {
  ENGINEPY_CHECK(tensor.device() == codes.device(), name, " must be on the same device as ", codes_name, " (",
                 codes.device(), "), got ", tensor.device());
}

}  // namespace

void codes_and_delays(const at::Tensor& codes, const char* name, const char* shape, const at::Tensor& delays) {
  int64_dtype(codes, name);
  ENGINEPY_CHECK(codes.dim() == 3, name, " must be 3-D ", shape, ", got ", codes.dim(), "-D with shape ",
                 codes.sizes());
  int64_dtype(delays, "delays");
  ENGINEPY_CHECK(delays.dim() == 1, "delays must be 1-D [K], got ", delays.dim(), "-D with shape ", delays.sizes());
  ENGINEPY_CHECK(delays.size(0) == codes.size(1), "delays has ", delays.size(0), " entries but ", name, " has ",
                 codes.size(1), " codebooks");
  same_device(delays, "delays", codes, name);
}

void per_row(const at::Tensor& tensor, const char* name, const at::Tensor& codes) {
  int64_dtype(tensor, name);
  ENGINEPY_CHECK(tensor.dim() == 1, name, " must be 1-D [B], got ", tensor.dim(), "-D with shape ", tensor.sizes());
  ENGINEPY_CHECK(tensor.size(0) == codes.size(0), name, " has ", tensor.size(0), " entries but codes has B = ",
                 codes.size(0), " rows");
  same_device(tensor, name, codes, "codes");
}

void tokens(const at::Tensor& tokens, const at::Tensor& codes) {
  int64_dtype(tokens, "tokens");
  ENGINEPY_CHECK(tokens.dim() == 2 && tokens.size(0) == codes.size(0) && tokens.size(1) == codes.size(1),
                 "tokens must have shape [B, K] = [", codes.size(0), ", ", codes.size(1), "], got ", tokens.sizes());
  same_device(tokens, "tokens", codes, "codes");
}

int64_t max_delay_on_host(const at::Tensor& delays_cpu) {
  ENGINEPY_CHECK(delays_cpu.is_cpu(), "max_delay_on_host needs delays on the CPU, got ", delays_cpu.device());
  const at::Tensor delays = delays_cpu.contiguous();
  const int64_t* d = delays.const_data_ptr<int64_t>();
  int64_t max_delay = 0;
  for (int64_t k = 0; k < delays.numel(); ++k) {
    ENGINEPY_CHECK(d[k] >= 0, "delays must be >= 0, got delays[", k, "] = ", d[k]);
    max_delay = std::max(max_delay, d[k]);
  }
  return max_delay;
}

}  // namespace checks

// The whole-sequence ops move at most a few MB once per request: plain serial loops. A thread pool
// measured no faster at these sizes and far slower whenever the cores were busy with other work.

at::Tensor delay_scatter_cpu(const at::Tensor& codes_in, const at::Tensor& delays_in, int64_t special) {
  checks::codes_and_delays(codes_in, "codes", "[B, K, T]", delays_in);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor delays = delays_in.contiguous();
  const int64_t max_delay = checks::max_delay_on_host(delays);
  const int64_t num_codebooks = codes.size(1);
  const int64_t frames = codes.size(2);
  const int64_t steps = frames + max_delay + 1;
  at::Tensor pattern = at::empty({codes.size(0), num_codebooks, steps}, codes.options());  // [B, K, S]

  const int64_t* src = codes.const_data_ptr<int64_t>();
  const int64_t* d = delays.const_data_ptr<int64_t>();
  int64_t* dst = pattern.mutable_data_ptr<int64_t>();
  for (int64_t row = 0; row < codes.size(0) * num_codebooks; ++row) {
    int64_t* out = dst + row * steps;
    const int64_t first = 1 + d[row % num_codebooks];  // column of frame 0
    std::fill_n(out, first, special);
    std::copy_n(src + row * frames, frames, out + first);
    std::fill_n(out + first + frames, steps - first - frames, special);
  }
  return pattern;
}

at::Tensor delay_gather_cpu(const at::Tensor& pattern_in, const at::Tensor& delays_in) {
  checks::codes_and_delays(pattern_in, "pattern", "[B, K, S]", delays_in);
  const at::Tensor pattern = pattern_in.contiguous();
  const at::Tensor delays = delays_in.contiguous();
  const int64_t max_delay = checks::max_delay_on_host(delays);
  const int64_t num_codebooks = pattern.size(1);
  const int64_t steps = pattern.size(2);
  const int64_t frames = steps - 1 - max_delay;
  ENGINEPY_CHECK(frames >= 0, "pattern has S = ", steps, " steps but delays need at least max(delays) + 1 = ",
                 max_delay + 1);
  at::Tensor codes = at::empty({pattern.size(0), num_codebooks, frames}, pattern.options());  // [B, K, T]

  const int64_t* src = pattern.const_data_ptr<int64_t>();
  const int64_t* d = delays.const_data_ptr<int64_t>();
  int64_t* dst = codes.mutable_data_ptr<int64_t>();
  for (int64_t row = 0; row < pattern.size(0) * num_codebooks; ++row) {
    std::copy_n(src + row * steps + 1 + d[row % num_codebooks], frames, dst + row * frames);
  }
  return codes;
}

// The per-step ops touch B * K elements (hundreds at most) and read their inputs through strides
// instead of copying them.

namespace {

// An int64 tensor of up to 3 dimensions indexed through its strides. Unlike at::TensorAccessor it has no
// checks of its own (their messages would go through an ostream, see ops.h): the callers checked the shapes.
template <typename T>
struct Strided {
  T* data;
  int64_t stride[3];
  T& operator()(int64_t i, int64_t j = 0, int64_t l = 0) const {
    return data[i * stride[0] + j * stride[1] + l * stride[2]];
  }
};

template <typename T>
Strided<T> strided(T* data, const at::Tensor& tensor) {
  Strided<T> view{data, {0, 0, 0}};
  for (int64_t i = 0; i < tensor.dim(); ++i) {
    view.stride[i] = tensor.stride(i);
  }
  return view;
}

Strided<const int64_t> reader(const at::Tensor& tensor) { return strided(tensor.const_data_ptr<int64_t>(), tensor); }

}  // namespace

at::Tensor delay_step_input_cpu(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& lengths,
                                const at::Tensor& delays, int64_t special) {
  checks::codes_and_delays(codes, "codes", "[B, K, Tmax]", delays);
  checks::per_row(step, "step", codes);
  checks::per_row(lengths, "lengths", codes);
  checks::max_delay_on_host(delays);
  const int64_t batch = codes.size(0);
  const int64_t num_codebooks = codes.size(1);
  const int64_t max_frames = codes.size(2);
  at::Tensor tokens = at::empty({batch, num_codebooks}, codes.options());  // [B, K]

  const auto c = reader(codes);
  const auto s = reader(step);
  const auto len = reader(lengths);
  const auto d = reader(delays);
  const auto out = strided(tokens.mutable_data_ptr<int64_t>(), tokens);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t end = std::min(len(b), max_frames);
    for (int64_t k = 0; k < num_codebooks; ++k) {
      const int64_t t = s(b) - 1 - d(k);
      out(b, k) = (t >= 0 && t < end) ? c(b, k, t) : special;
    }
  }
  return tokens;
}

void delay_step_write_cpu(const at::Tensor& codes, const at::Tensor& tokens, const at::Tensor& step,
                          const at::Tensor& lengths, const at::Tensor& prompt_lengths, const at::Tensor& delays) {
  checks::codes_and_delays(codes, "codes", "[B, K, Tmax]", delays);
  checks::tokens(tokens, codes);
  checks::per_row(step, "step", codes);
  checks::per_row(lengths, "lengths", codes);
  checks::per_row(prompt_lengths, "prompt_lengths", codes);
  checks::max_delay_on_host(delays);
  const int64_t batch = codes.size(0);
  const int64_t num_codebooks = codes.size(1);
  const int64_t max_frames = codes.size(2);

  const auto c = strided(codes.mutable_data_ptr<int64_t>(), codes);
  const auto tok = reader(tokens);
  const auto s = reader(step);
  const auto len = reader(lengths);
  const auto prompt = reader(prompt_lengths);
  const auto d = reader(delays);
  for (int64_t b = 0; b < batch; ++b) {
    // Never below frame 0 or past Tmax, whatever the lengths say: the bounds keep the write in memory.
    const int64_t begin = std::max<int64_t>(prompt(b), 0);
    const int64_t end = std::min(len(b), max_frames);
    for (int64_t k = 0; k < num_codebooks; ++k) {
      const int64_t t = s(b) - d(k);
      if (t >= begin && t < end) {
        c(b, k, t) = tok(b, k);
      }
    }
  }
}

}  // namespace enginepy
