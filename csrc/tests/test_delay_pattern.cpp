// C++ checks of the delay-pattern ops, run by ctest: direct calls and calls through the dispatcher,
// compared with loops written out from the layout in ops.h. Exit status 0 when every check passes.
#include "../ops.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

void check_throws(const std::function<void()>& call, const std::string& expected, const std::string& what) {
  try {
    call();
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    check(message.find(expected) != std::string::npos, what + ": message '" + message + "' lacks '" + expected + "'");
    return;
  }
  check(false, what + ": no error raised");
}

at::Tensor long_tensor(const std::vector<int64_t>& values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong));
}

// pattern [B, K, T + max(delays) + 1] by the definition, one element at a time.
at::Tensor scatter_by_definition(const at::Tensor& codes, const std::vector<int64_t>& delays, int64_t special) {
  int64_t max_delay = 0;
  for (int64_t d : delays) max_delay = std::max(max_delay, d);
  const int64_t batch = codes.size(0), num_codebooks = codes.size(1), frames = codes.size(2);
  at::Tensor pattern = at::full({batch, num_codebooks, frames + max_delay + 1}, special, codes.options());
  auto p = pattern.accessor<int64_t, 3>();
  const auto c = codes.accessor<const int64_t, 3>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < num_codebooks; ++k)
      for (int64_t t = 0; t < frames; ++t) p[b][k][1 + t + delays[k]] = c[b][k][t];
  return pattern;
}

void test_scatter_gather(const std::vector<int64_t>& delays, int64_t batch, int64_t frames) {
  const std::string name = "K=" + std::to_string(delays.size()) + " T=" + std::to_string(frames);
  const int64_t special = 2048;
  const auto num_codebooks = static_cast<int64_t>(delays.size());
  const at::Tensor codes = at::randint(0, special, {batch, num_codebooks, frames}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor d = long_tensor(delays);
  const at::Tensor expected = scatter_by_definition(codes, delays, special);

  const at::Tensor pattern = enginepy::delay_scatter_cpu(codes, d, special);
  check(at::equal(pattern, expected), "delay_scatter " + name);
  check(at::equal(enginepy::delay_gather_cpu(pattern, d), codes), "delay_gather round trip " + name);

  static const auto scatter = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("enginepy::delay_scatter", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  static const auto gather = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("enginepy::delay_gather", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  check(at::equal(scatter.call(codes, d, special), expected), "dispatcher delay_scatter " + name);
  check(at::equal(gather.call(expected, d), codes), "dispatcher delay_gather " + name);

  // A strided view: every other frame of a wider tensor.
  const at::Tensor wide = at::randint(0, special, {batch, num_codebooks, 2 * frames}, codes.options());
  const at::Tensor strided = wide.slice(2, 0, 2 * frames, 2);
  check(at::equal(enginepy::delay_scatter_cpu(strided, d, special),
                  scatter_by_definition(strided.contiguous(), delays, special)),
        "delay_scatter strided " + name);
}

// Stepping through every decode step with step_input / step_write rebuilds the pattern and the codes.
void test_stepping(const std::vector<int64_t>& delays) {
  const int64_t special = 99, batch = 3, frames = 6;
  const auto num_codebooks = static_cast<int64_t>(delays.size());
  const at::TensorOptions options = at::TensorOptions().dtype(at::kLong);
  const at::Tensor full = at::randint(0, special, {batch, num_codebooks, frames}, options);
  const at::Tensor d = long_tensor(delays);
  const at::Tensor pattern = enginepy::delay_scatter_cpu(full, d, special);
  const at::Tensor lengths = at::full({batch}, frames, options);
  const at::Tensor prompt_lengths = long_tensor({0, 2, frames});
  at::Tensor codes = at::full({batch, num_codebooks, frames}, -1, options);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t prompt = prompt_lengths[b].item<int64_t>();
    codes[b].slice(1, 0, prompt).copy_(full[b].slice(1, 0, prompt));
  }
  static const auto step_input =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("enginepy::delay_step_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  bool inputs_match = true;
  for (int64_t s = 0; s < pattern.size(2) - 1; ++s) {
    const at::Tensor step = at::full({batch}, s, options);
    const at::Tensor tokens = step_input.call(codes, step, lengths, d, special);
    inputs_match = inputs_match && at::equal(tokens, pattern.select(2, s));
    // The model "predicts" pattern column s + 1, which holds frame s - delays[k] of codebook k.
    enginepy::delay_step_write_cpu(codes, pattern.select(2, s + 1), step, lengths, prompt_lengths, d);
  }
  check(inputs_match, "delay_step_input walks the pattern, K=" + std::to_string(num_codebooks));
  check(at::equal(codes, full), "delay_step_write rebuilds the codes, K=" + std::to_string(num_codebooks));
}

void test_bad_input() {
  const at::TensorOptions options = at::TensorOptions().dtype(at::kLong);
  const at::Tensor codes = at::zeros({2, 4, 5}, options);
  check_throws([&] { enginepy::delay_scatter_cpu(codes, long_tensor({0, -1, 2, 3}), 0); }, "delays must be >= 0",
               "negative delay");
  check_throws([&] { enginepy::delay_scatter_cpu(codes, long_tensor({0, 1, 2}), 0); },
               "delays has 3 entries but codes has 4 codebooks", "codebook mismatch");
  check_throws([&] { enginepy::delay_scatter_cpu(codes.to(at::kFloat), long_tensor({0, 1, 2, 3}), 0); },
               "codes must be int64", "float codes");
  check_throws([&] { enginepy::delay_gather_cpu(at::zeros({2, 4, 3}, options), long_tensor({0, 1, 2, 3})); },
               "pattern has S = 3 steps", "short pattern");
  check_throws(
      [&] {
        enginepy::delay_step_input_cpu(codes, at::zeros({3}, options), at::zeros({2}, options),
                                       long_tensor({0, 1, 2, 3}), 0);
      },
      "step has 3 entries but codes has B = 2 rows", "step batch mismatch");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_scatter_gather({0, 1, 2, 3}, 2, 7);
  test_scatter_gather({0, 0, 1, 1, 2, 2, 3, 3}, 3, 5);
  test_scatter_gather({2, 0, 5}, 1, 1);
  test_scatter_gather({0}, 4, 0);
  test_stepping({0, 1, 2, 3});
  test_stepping({0, 0, 1, 1, 2, 2, 3, 3});
  test_stepping({3, 0, 1});
  test_bad_input();
  if (failures != 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all delay-pattern checks passed\n";
  return 0;
}
