// CPU skinny GEMM: packing, activation preparation, per-ISA kernels and the op. Layout and numerics: cpu_linear.h.
//
// Structure of one call: the activations are prepared once (bf16 rounding, or the int8 passes with their
// per-row scales and sums), then the 32-column blocks are split across threads (at::parallel_for). Each thread
// walks its blocks in order, so it streams one contiguous range of the packed weights; within a block the
// M rows go through in tiles whose accumulators all stay in registers (a second tile re-reads the block
// from L2). The epilogue (per-channel scale, bias, residual, rounding to the output dtype) runs on the tile.
#include "cpu_linear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// The x86 kernels need GCC/Clang target attributes; elsewhere (or built with -DENGINEPY_X86_KERNELS=0) only
// the portable scalar path is compiled.
#ifndef ENGINEPY_X86_KERNELS
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ENGINEPY_X86_KERNELS 1
#else
#define ENGINEPY_X86_KERNELS 0
#endif
#endif
#if ENGINEPY_X86_KERNELS
#include <immintrin.h>
#define ENGINEPY_TARGET(isa) __attribute__((target(isa)))
#endif

namespace enginepy {
namespace {

constexpr int64_t kBlock = 32;   // output columns per packed block
constexpr int64_t kBf16Group = 2;  // consecutive k per column in one bf16 group (one fp32 lane of vdpbf16ps)
constexpr int64_t kInt8Group = 4;  // consecutive k per column in one int8 group (one int32 lane of vpdpbusd)
constexpr int kMaxTile = 12;     // most rows of one register tile (the widest kernel's accumulators)
// int8 sums: |sum_k u8 * x8| <= K * 255 * 127 must stay below 2^31.
constexpr int64_t kMaxInt8K = 65536;
// Second int8 pass: x - sx * xh lies in [-sx/2, sx/2]; it is quantized with step sx / 254, so xl fits int8.
constexpr float kLowSteps = 254.0f;

enum class Kind { bf16, int8 };
enum class Isa { dot, avx512, avx2, scalar };
constexpr Isa kIsas[] = {Isa::dot, Isa::avx512, Isa::avx2, Isa::scalar};

const char* isa_name(Kind kind, Isa isa) {
  switch (isa) {
    case Isa::dot:
      return kind == Kind::bf16 ? "avx512bf16" : "avx512vnni";
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    case Isa::scalar:
      return "scalar";
  }
  return "?";
}

bool isa_supported(Kind kind, Isa isa) {
#if ENGINEPY_X86_KERNELS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case Isa::dot:
      return avx512 && (kind == Kind::bf16 ? __builtin_cpu_supports("avx512bf16") != 0
                                           : __builtin_cpu_supports("avx512vnni") != 0);
    case Isa::avx512:
      return avx512;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::scalar:
      return true;
  }
  return false;
#else
  (void)kind;
  return isa == Isa::scalar;
#endif
}

Kind parse_kind(std::string_view kind) {
  if (kind == "bf16") return Kind::bf16;
  if (kind == "int8") return Kind::int8;
  TORCH_CHECK(false, "kind must be 'bf16' or 'int8', got '", std::string(kind), "'");
  return Kind::bf16;
}

std::string supported_list(Kind kind) {
  std::string out;
  for (Isa isa : kIsas) {
    if (isa_supported(kind, isa)) out += std::string(out.empty() ? "" : ",") + isa_name(kind, isa);
  }
  return out;
}

Isa parse_isa(Kind kind, std::string_view isa) {
  if (isa == "auto") {
    for (Isa candidate : kIsas) {
      if (isa_supported(kind, candidate)) return candidate;
    }
  }
  for (Isa candidate : kIsas) {
    if (isa == isa_name(kind, candidate)) {
      TORCH_CHECK(isa_supported(kind, candidate), "isa '", std::string(isa), "' is not supported by this CPU for ",
                  kind == Kind::bf16 ? "bf16" : "int8", " weights; supported: ", supported_list(kind));
      return candidate;
    }
  }
  TORCH_CHECK(false, "isa must be 'auto' or one of ", supported_list(kind), " for ",
              kind == Kind::bf16 ? "bf16" : "int8", " weights, got '", std::string(isa), "'");
  return Isa::scalar;
}

// Round-to-nearest-even of |v| < 2^22 with plain adds (vectorises at any SSE level, unlike nearbyint).
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }

inline float bf16_value(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &word, sizeof(v));
  return v;
}

// Everything the kernels read or write in one call; activations prepared once, before the threads start.
struct Problem {
  int64_t m = 0, n = 0, kp = 0;  // rows, output columns, K padded to the group size
  int passes = 2;                // int8: activation passes (1: xh only, 2: xh and xl)
  const void* w = nullptr;       // packed blocks (layout in cpu_linear.h)
  // Activations, group-major so that one group's operands of all rows sit together and a tile reads them at
  // fixed offsets from one pointer:
  //   bf16 [kp/2][M][2]: bf16 bits (k even, k odd) for the dot kernel, the same values as fp32 for the others
  //   int8 [kp/4][M][passes][4]: quads of xh (and xl) as int8 for the dot kernel, as int16 for the others,
  //        where x ~= sh[m] * xh (+ sl[m] * xl).
  const uint16_t* xb = nullptr;
  const float* xf = nullptr;
  const int8_t* x8 = nullptr;
  const int16_t* x16 = nullptr;
  const float* sh = nullptr;
  const float* sl = nullptr;
  const int32_t* sumh = nullptr;  // row sums of xh and xl: the stored weights are q + 128, so
  const int32_t* suml = nullptr;  // sum(u * x) - 128 * sum(x) = sum(q * x)
  // Epilogue: y = acc * wscale[n] + bias[n] + residual[m, n], rounded once into out [M, N].
  const float* wscale = nullptr;
  const float* bias = nullptr;
  const void* residual = nullptr;  // out's dtype
  void* out = nullptr;
  bool out_bf16 = false;
};

// The epilogue of rows m0 .. m0+mt-1 of block columns c0 .. c0+31 from tile [mt][32] (fp32 sums).
void store_tile(const Problem& p, const float* tile, int mt, int64_t m0, int64_t c0) {
  const int64_t valid = std::min<int64_t>(kBlock, p.n - c0);
  for (int r = 0; r < mt; ++r) {
    float v[kBlock];
    std::memcpy(v, tile + r * kBlock, sizeof(v));
    const int64_t at = (m0 + r) * p.n + c0;
    if (p.wscale != nullptr) {
      for (int64_t j = 0; j < valid; ++j) v[j] *= p.wscale[c0 + j];
    }
    if (p.bias != nullptr) {
      for (int64_t j = 0; j < valid; ++j) v[j] += p.bias[c0 + j];
    }
    if (p.out_bf16) {
      const uint16_t* res = static_cast<const uint16_t*>(p.residual);
      if (res != nullptr) {
        for (int64_t j = 0; j < valid; ++j) v[j] += bf16_value(res[at + j]);
      }
      uint16_t* out = static_cast<uint16_t*>(p.out) + at;
      for (int64_t j = 0; j < valid; ++j) out[j] = bf16_bits(v[j]);
    } else {
      const float* res = static_cast<const float*>(p.residual);
      if (res != nullptr) {
        for (int64_t j = 0; j < valid; ++j) v[j] += res[at + j];
      }
      std::memcpy(static_cast<float*>(p.out) + at, v, valid * sizeof(float));
    }
  }
}

// One ISA's kernel: the fp32 sums of rows m0 .. m0+mt-1 (mt <= max_rows) against one packed block -> tile [mt][32].
using RowsFn = void (*)(const Problem& p, const void* block, int64_t m0, int mt, float* tile);
struct Kernel {
  RowsFn rows;
  int max_rows;  // how many rows' accumulators fit in the ISA's registers
};

// The blocks b0 .. b1-1 of one thread, in order (one contiguous stream of packed weights). With more rows than
// one tile holds, the later tiles re-read the block from L2.
void run_blocks(const Problem& p, const Kernel& kernel, int64_t block_bytes, int64_t b0, int64_t b1) {
  alignas(64) float tile[kMaxTile * kBlock];
  const int64_t tiles = (p.m + kernel.max_rows - 1) / kernel.max_rows;
  const int64_t base = p.m / tiles, extra = p.m % tiles;  // tiles as equal as possible
  for (int64_t b = b0; b < b1; ++b) {
    const void* block = static_cast<const char*>(p.w) + b * block_bytes;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = t * base + std::min(t, extra);
      const int mt = static_cast<int>(base + (t < extra ? 1 : 0));
      kernel.rows(p, block, m0, mt, tile);
      store_tile(p, tile, mt, m0, b * kBlock);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Scalar kernels: the same sums as the vector ones, in plain C++ (any CPU).

void bf16_rows_scalar(const Problem& p, const void* block, int64_t m0, int mt, float* tile) {
  const uint16_t* w = static_cast<const uint16_t*>(block);
  for (int r = 0; r < mt; ++r) {
    float* acc = tile + r * kBlock;
    std::fill(acc, acc + kBlock, 0.0f);
    for (int64_t g = 0; g < p.kp / kBf16Group; ++g) {
      const uint16_t* wg = w + g * kBlock * kBf16Group;
      const float* x = p.xf + (g * p.m + m0 + r) * 2;
      for (int64_t j = 0; j < kBlock; ++j) {
        acc[j] += bf16_value(wg[2 * j + 1]) * x[1];
        acc[j] += bf16_value(wg[2 * j]) * x[0];
      }
    }
  }
}

// The int8 result of one row from its integer sums: sh * (sum(u * xh) - 128 sum(xh)) (+ sl * (same for xl)).
inline float int8_row_value(const Problem& p, int64_t m, int32_t acc_h, int32_t acc_l) {
  const float value = p.sh[m] * static_cast<float>(acc_h - 128 * p.sumh[m]);
  return p.passes == 1 ? value : std::fma(p.sl[m], static_cast<float>(acc_l - 128 * p.suml[m]), value);
}

void int8_rows_scalar(const Problem& p, const void* block, int64_t m0, int mt, float* tile) {
  const uint8_t* w = static_cast<const uint8_t*>(block);
  for (int r = 0; r < mt; ++r) {
    for (int64_t j = 0; j < kBlock; ++j) {
      int32_t acc_h = 0, acc_l = 0;
      for (int64_t g = 0; g < p.kp / kInt8Group; ++g) {
        const uint8_t* wg = w + (g * kBlock + j) * kInt8Group;
        const int16_t* x = p.x16 + (g * p.m + m0 + r) * p.passes * kInt8Group;  // xh quad (then xl quad)
        for (int64_t e = 0; e < kInt8Group; ++e) {
          acc_h += wg[e] * x[e];
          acc_l += p.passes == 1 ? 0 : wg[e] * x[kInt8Group + e];
        }
      }
      tile[r * kBlock + j] = int8_row_value(p, m0 + r, acc_h, acc_l);
    }
  }
}

#if ENGINEPY_X86_KERNELS
// GCC 12's AVX-512 headers build some results from a self-initialised "undefined" vector, which -Wall reports
// as uninitialised once inlined into a target-attributed function; the value is never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define ENGINEPY_AVX512 "avx512f,avx512bw,avx512vl,avx2,fma"
#define ENGINEPY_AVX512_BF16 "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
#define ENGINEPY_AVX512_VNNI "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define ENGINEPY_AVX2 "avx2,fma"
// Loops over a tile's rows and vectors are unrolled completely, so that every accumulator is a named register
// rather than an array element in memory.
#define ENGINEPY_UNROLL _Pragma("GCC unroll 16")

// NAME(p, block, m0, mt, tile) calls TILE<mt, ...>(p, block, m0, tile) for a run-time 1 <= mt <= 12: the tile kernels
// need mt at compile time to keep their accumulators in registers. A macro, not a template taking a lambda:
// a lambda would not inherit the target ISA.
#define ENGINEPY_TILE_CASE(TILE, N, ...)                    \
  case N:                                                   \
    TILE<N __VA_OPT__(, ) __VA_ARGS__>(p, block, m0, tile); \
    break;
#define ENGINEPY_ROWS_FN(NAME, ISA, TILE, ...)                                                  \
  ENGINEPY_TARGET(ISA) void NAME(const Problem& p, const void* block, int64_t m0, int mt, float* tile) { \
    switch (mt) {                                                                               \
      ENGINEPY_TILE_CASE(TILE, 1, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 2, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 3, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 4, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 5, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 6, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 7, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 8, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 9, __VA_ARGS__)                                                               \
      ENGINEPY_TILE_CASE(TILE, 10, __VA_ARGS__)                                                              \
      ENGINEPY_TILE_CASE(TILE, 11, __VA_ARGS__)                                                              \
      ENGINEPY_TILE_CASE(TILE, 12, __VA_ARGS__)                                                              \
      default:                                                                                  \
        TORCH_CHECK(false, "internal: a tile of ", mt, " rows");                                \
    }                                                                                           \
  }

inline int32_t load_i32(const void* at) {
  int32_t v;
  std::memcpy(&v, at, sizeof(v));
  return v;
}

inline int64_t load_i64(const void* at) {
  int64_t v;
  std::memcpy(&v, at, sizeof(v));
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// bf16, AVX512-BF16: per group of 2 k, two 64-byte loads give 32 columns; each row adds its broadcast
// (x[2g], x[2g+1]) pair with one vdpbf16ps per 16 columns. 24 accumulators: 12 rows.

template <int MT>
ENGINEPY_TARGET(ENGINEPY_AVX512_BF16)
inline void bf16_tile_dot(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint16_t* w = static_cast<const uint16_t*>(block);
  __m512 acc[MT][2];
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.kp / kBf16Group; ++g) {
    const __m512i w0 = _mm512_loadu_si512(w + g * 64);
    const __m512i w1 = _mm512_loadu_si512(w + g * 64 + 32);
    const uint16_t* x = p.xb + (g * p.m + m0) * 2;
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      const __m512i xr = _mm512_set1_epi32(load_i32(x + 2 * r));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)xr);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w1, (__m512bh)xr);
    }
  }
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) {
    _mm512_storeu_ps(tile + r * kBlock, acc[r][0]);
    _mm512_storeu_ps(tile + r * kBlock + 16, acc[r][1]);
  }
}
ENGINEPY_ROWS_FN(bf16_rows_dot, ENGINEPY_AVX512_BF16, bf16_tile_dot)

// bf16, AVX512F: a 32-bit lane holds (k even, k odd) of one column, so `lane << 16` and `lane & 0xffff0000`
// are the two weights as fp32, each multiplied by its broadcast x with one FMA. The odd k is added first, as
// vdpbf16ps does, so every bf16 path rounds the same sums (bf16 products are exact in fp32).
template <int MT>
ENGINEPY_TARGET(ENGINEPY_AVX512)
inline void bf16_tile_avx512(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint16_t* w = static_cast<const uint16_t*>(block);
  __m512 acc[MT][2];
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t g = 0; g < p.kp / kBf16Group; ++g) {
    __m512 even[2], odd[2];
    ENGINEPY_UNROLL
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(w + g * 64 + h * 32);
      even[h] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      odd[h] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    const float* x = p.xf + (g * p.m + m0) * 2;
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      const __m512 xe = _mm512_set1_ps(x[2 * r]);
      const __m512 xo = _mm512_set1_ps(x[2 * r + 1]);
      ENGINEPY_UNROLL
      for (int h = 0; h < 2; ++h) {
        acc[r][h] = _mm512_fmadd_ps(odd[h], xo, acc[r][h]);
        acc[r][h] = _mm512_fmadd_ps(even[h], xe, acc[r][h]);
      }
    }
  }
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) {
    _mm512_storeu_ps(tile + r * kBlock, acc[r][0]);
    _mm512_storeu_ps(tile + r * kBlock + 16, acc[r][1]);
  }
}
ENGINEPY_ROWS_FN(bf16_rows_avx512, ENGINEPY_AVX512, bf16_tile_avx512)

// bf16, AVX2: the same widening on 8 lanes; 16 registers hold 4 rows x 16 columns, so a block is two halves.
template <int MT>
ENGINEPY_TARGET(ENGINEPY_AVX2)
inline void bf16_tile_avx2(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint16_t* w = static_cast<const uint16_t*>(block);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  ENGINEPY_UNROLL
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MT][2];
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.kp / kBf16Group; ++g) {
      __m256 even[2], odd[2];
      ENGINEPY_UNROLL
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + half * 32 + h * 16));
        even[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      }
      const float* x = p.xf + (g * p.m + m0) * 2;
      ENGINEPY_UNROLL
      for (int r = 0; r < MT; ++r) {
        const __m256 xe = _mm256_set1_ps(x[2 * r]);
        const __m256 xo = _mm256_set1_ps(x[2 * r + 1]);
        ENGINEPY_UNROLL
        for (int h = 0; h < 2; ++h) {
          acc[r][h] = _mm256_fmadd_ps(odd[h], xo, acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(even[h], xe, acc[r][h]);
        }
      }
    }
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      _mm256_storeu_ps(tile + r * kBlock + half * 16, acc[r][0]);
      _mm256_storeu_ps(tile + r * kBlock + half * 16 + 8, acc[r][1]);
    }
  }
}
ENGINEPY_ROWS_FN(bf16_rows_avx2, ENGINEPY_AVX2, bf16_tile_avx2)

// ---------------------------------------------------------------------------------------------------------
// int8: P = 1 or 2 activation passes (xh, then xl), each with its own int32 sums.

// sum_p s_p * (acc_p - 128 sum_p(x)) for one row, 16 columns (the same operations as int8_row_value).
template <int P>
ENGINEPY_TARGET(ENGINEPY_AVX512)
inline __m512 int8_combine512(const Problem& p, int64_t m, const __m512i* acc) {
  const __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[0], _mm512_set1_epi32(128 * p.sumh[m])));
  __m512 value = _mm512_mul_ps(_mm512_set1_ps(p.sh[m]), h);
  if constexpr (P == 2) {
    const __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[1], _mm512_set1_epi32(128 * p.suml[m])));
    value = _mm512_fmadd_ps(_mm512_set1_ps(p.sl[m]), l, value);
  }
  return value;
}

// acc += u8 . s8 (vpdpbusd). Written out because GCC 12 sends the accumulator of its vpdpbusd builtin through
// the stack on every iteration (measured: half the speed of the bf16 kernel); this keeps it in its register.
ENGINEPY_TARGET(ENGINEPY_AVX512_VNNI)
inline void dpbusd(__m512i& acc, __m512i u8, __m512i s8) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8)); }

// int8, AVX512-VNNI: per group of 4 k, two 64-byte loads give 32 columns of uint8 weights; each row adds its
// broadcast int8 quad of each pass with one vpdpbusd per 16 columns. 24 accumulators: 12 rows / P.
template <int MT, int P>
ENGINEPY_TARGET(ENGINEPY_AVX512_VNNI)
inline void int8_tile_dot(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint8_t* w = static_cast<const uint8_t*>(block);
  __m512i acc[MT][2][P];
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) {
    ENGINEPY_UNROLL
    for (int c = 0; c < 2; ++c) {
      ENGINEPY_UNROLL
      for (int q = 0; q < P; ++q) acc[r][c][q] = _mm512_setzero_si512();
    }
  }
  for (int64_t g = 0; g < p.kp / kInt8Group; ++g) {
    const __m512i w0 = _mm512_loadu_si512(w + g * 128);
    const __m512i w1 = _mm512_loadu_si512(w + g * 128 + 64);
    const int8_t* x = p.x8 + (g * p.m + m0) * kInt8Group * P;
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      ENGINEPY_UNROLL
      for (int q = 0; q < P; ++q) {
        const __m512i xq = _mm512_set1_epi32(load_i32(x + (r * P + q) * kInt8Group));
        dpbusd(acc[r][0][q], w0, xq);
        dpbusd(acc[r][1][q], w1, xq);
      }
    }
  }
  ENGINEPY_UNROLL
  for (int r = 0; r < MT; ++r) {
    _mm512_storeu_ps(tile + r * kBlock, int8_combine512<P>(p, m0 + r, acc[r][0]));
    _mm512_storeu_ps(tile + r * kBlock + 16, int8_combine512<P>(p, m0 + r, acc[r][1]));
  }
}
ENGINEPY_ROWS_FN(int8_rows_dot1, ENGINEPY_AVX512_VNNI, int8_tile_dot, 1)
ENGINEPY_ROWS_FN(int8_rows_dot2, ENGINEPY_AVX512_VNNI, int8_tile_dot, 2)

// int8, AVX512BW: 8 columns x 4 k of uint8 widen to 32 int16; vpmaddwd with the broadcast int16 quad
// (x0, x1, x2, x3) gives per column two int32 lanes (k0, k1) and (k2, k3), added up at the end.
template <int MT, int P>
ENGINEPY_TARGET(ENGINEPY_AVX512)
inline void int8_tile_avx512(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint8_t* w = static_cast<const uint8_t*>(block);
  ENGINEPY_UNROLL
  for (int half = 0; half < 2; ++half) {
    __m512i acc[MT][2][P];
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      ENGINEPY_UNROLL
      for (int v = 0; v < 2; ++v) {
        ENGINEPY_UNROLL
        for (int q = 0; q < P; ++q) acc[r][v][q] = _mm512_setzero_si512();
      }
    }
    for (int64_t g = 0; g < p.kp / kInt8Group; ++g) {
      __m512i wv[2];
      ENGINEPY_UNROLL
      for (int v = 0; v < 2; ++v) {
        wv[v] = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 128 + half * 64 + v * 32)));
      }
      const int16_t* x = p.x16 + (g * p.m + m0) * kInt8Group * P;
      ENGINEPY_UNROLL
      for (int r = 0; r < MT; ++r) {
        ENGINEPY_UNROLL
        for (int q = 0; q < P; ++q) {
          const __m512i xq = _mm512_set1_epi64(load_i64(x + (r * P + q) * kInt8Group));
          ENGINEPY_UNROLL
          for (int v = 0; v < 2; ++v) acc[r][v][q] = _mm512_add_epi32(acc[r][v][q], _mm512_madd_epi16(wv[v], xq));
        }
      }
    }
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      // Lanes 2i and 2i+1 are column i: add them in the low half of each 64-bit lane, then keep those halves.
      __m512i sums[P];
      ENGINEPY_UNROLL
      for (int q = 0; q < P; ++q) {
        __m256i col[2];
        ENGINEPY_UNROLL
        for (int v = 0; v < 2; ++v) {
          col[v] = _mm512_cvtepi64_epi32(_mm512_add_epi32(acc[r][v][q], _mm512_srli_epi64(acc[r][v][q], 32)));
        }
        sums[q] = _mm512_inserti64x4(_mm512_castsi256_si512(col[0]), col[1], 1);
      }
      _mm512_storeu_ps(tile + r * kBlock + half * 16, int8_combine512<P>(p, m0 + r, sums));
    }
  }
}
ENGINEPY_ROWS_FN(int8_rows_avx512_1, ENGINEPY_AVX512, int8_tile_avx512, 1)
ENGINEPY_ROWS_FN(int8_rows_avx512_2, ENGINEPY_AVX512, int8_tile_avx512, 2)

// int8, AVX2: the same on 8 lanes; a block is four groups of 8 columns.
template <int MT, int P>
ENGINEPY_TARGET(ENGINEPY_AVX2)
inline void int8_tile_avx2(const Problem& p, const void* block, int64_t m0, float* tile) {
  const uint8_t* w = static_cast<const uint8_t*>(block);
  const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  ENGINEPY_UNROLL
  for (int octet = 0; octet < 4; ++octet) {
    __m256i acc[MT][2][P];
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      ENGINEPY_UNROLL
      for (int v = 0; v < 2; ++v) {
        ENGINEPY_UNROLL
        for (int q = 0; q < P; ++q) acc[r][v][q] = _mm256_setzero_si256();
      }
    }
    for (int64_t g = 0; g < p.kp / kInt8Group; ++g) {
      __m256i wv[2];
      ENGINEPY_UNROLL
      for (int v = 0; v < 2; ++v) {
        wv[v] = _mm256_cvtepu8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 128 + octet * 32 + v * 16)));
      }
      const int16_t* x = p.x16 + (g * p.m + m0) * kInt8Group * P;
      ENGINEPY_UNROLL
      for (int r = 0; r < MT; ++r) {
        ENGINEPY_UNROLL
        for (int q = 0; q < P; ++q) {
          const __m256i xq = _mm256_set1_epi64x(load_i64(x + (r * P + q) * kInt8Group));
          ENGINEPY_UNROLL
          for (int v = 0; v < 2; ++v) acc[r][v][q] = _mm256_add_epi32(acc[r][v][q], _mm256_madd_epi16(wv[v], xq));
        }
      }
    }
    ENGINEPY_UNROLL
    for (int r = 0; r < MT; ++r) {
      const int64_t m = m0 + r;
      __m256 value = _mm256_setzero_ps();
      ENGINEPY_UNROLL
      for (int q = 0; q < P; ++q) {
        __m128i col[2];
        ENGINEPY_UNROLL
        for (int v = 0; v < 2; ++v) {
          const __m256i pairs = _mm256_add_epi32(acc[r][v][q], _mm256_srli_epi64(acc[r][v][q], 32));
          col[v] = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pairs, evens));
        }
        const __m256i sum = _mm256_sub_epi32(_mm256_set_m128i(col[1], col[0]),
                                             _mm256_set1_epi32(128 * (q == 0 ? p.sumh[m] : p.suml[m])));
        const __m256 part = _mm256_cvtepi32_ps(sum);
        value = q == 0 ? _mm256_mul_ps(_mm256_set1_ps(p.sh[m]), part)
                       : _mm256_fmadd_ps(_mm256_set1_ps(p.sl[m]), part, value);
      }
      _mm256_storeu_ps(tile + r * kBlock + octet * 8, value);
    }
  }
}
ENGINEPY_ROWS_FN(int8_rows_avx2_1, ENGINEPY_AVX2, int8_tile_avx2, 1)
ENGINEPY_ROWS_FN(int8_rows_avx2_2, ENGINEPY_AVX2, int8_tile_avx2, 2)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // ENGINEPY_X86_KERNELS

// max_rows: the accumulators of that many rows (and the weights and broadcasts) fit in the ISA's registers.
Kernel kernel_for(Kind kind, Isa isa, int passes) {
#if ENGINEPY_X86_KERNELS
  const bool one = passes == 1;
  switch (isa) {
    case Isa::dot:
      if (kind == Kind::bf16) return Kernel{bf16_rows_dot, 12};
      return one ? Kernel{int8_rows_dot1, 12} : Kernel{int8_rows_dot2, 6};
    case Isa::avx512:
      if (kind == Kind::bf16) return Kernel{bf16_rows_avx512, 12};
      return one ? Kernel{int8_rows_avx512_1, 8} : Kernel{int8_rows_avx512_2, 4};
    case Isa::avx2:
      if (kind == Kind::bf16) return Kernel{bf16_rows_avx2, 4};
      return one ? Kernel{int8_rows_avx2_1, 4} : Kernel{int8_rows_avx2_2, 2};
    case Isa::scalar:
      break;
  }
#endif
  (void)isa;
  (void)passes;
  return kind == Kind::bf16 ? Kernel{bf16_rows_scalar, kMaxTile} : Kernel{int8_rows_scalar, kMaxTile};
}

// ---------------------------------------------------------------------------------------------------------
// Activation preparation (once per call, M x K elements: small next to the N x K weights).

// Row m of x as fp32 (x2d [M, K], fp32 or bf16, unit stride in k).
void row_as_float(const at::Tensor& x2d, int64_t m, float* dst) {
  const int64_t k = x2d.size(1);
  if (x2d.scalar_type() == at::kFloat) {
    std::memcpy(dst, x2d.const_data_ptr<float>() + m * x2d.stride(0), k * sizeof(float));
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x2d.const_data_ptr<at::BFloat16>()) + m * x2d.stride(0);
    for (int64_t i = 0; i < k; ++i) dst[i] = bf16_value(src[i]);
  }
}

// bf16 weights: x rounded to bf16, zero-padded to kp, group-major [kp/2][M][2] (bits for the dot kernel,
// fp32 values for the others).
void prepare_bf16(const at::Tensor& x2d, int64_t kp, Isa isa, Problem& p, std::vector<uint16_t>& bits,
                  std::vector<float>& values) {
  const int64_t m = x2d.size(0), k = x2d.size(1);
  std::vector<float> row(k);
  if (isa == Isa::dot) {
    bits.assign(m * kp, 0);
  } else {
    values.assign(m * kp, 0.0f);
  }
  for (int64_t r = 0; r < m; ++r) {
    row_as_float(x2d, r, row.data());
    for (int64_t i = 0; i < k; ++i) {
      const int64_t at = ((i >> 1) * m + r) * kBf16Group + (i & 1);
      const uint16_t b = bf16_bits(row[i]);
      if (isa == Isa::dot) {
        bits[at] = b;
      } else {
        values[at] = bf16_value(b);
      }
    }
  }
  p.xb = bits.data();
  p.xf = values.data();
}

struct Int8Activations {
  std::vector<int8_t> narrow;
  std::vector<int16_t> wide;
  std::vector<float> sh, sl;
  std::vector<int32_t> sumh, suml;
};

// int8 weights: per row, sx = absmax / 127, t = x / sx, xh = round(t), and with two passes
// xl = round((t - xh) * 254), so x ~= sx * xh (+ (sx / 254) * xl); group-major [kp/4][M][passes][4] (int8 for
// the dot kernel, int16 for the others). A row with a NaN or infinite entry gets NaN scales (NaN outputs).
void prepare_int8(const at::Tensor& x2d, int64_t kp, Isa isa, Problem& p, Int8Activations& buf) {
  const int64_t m = x2d.size(0), k = x2d.size(1), passes = p.passes;
  const bool narrow = isa == Isa::dot;
  if (narrow) {
    buf.narrow.assign(passes * m * kp, 0);
  } else {
    buf.wide.assign(passes * m * kp, 0);
  }
  buf.sh.assign(m, 0.0f);
  buf.sl.assign(m, 0.0f);
  buf.sumh.assign(m, 0);
  buf.suml.assign(m, 0);
  std::vector<float> row(k), t(k), hi(k), lo(k);
  for (int64_t r = 0; r < m; ++r) {
    row_as_float(x2d, r, row.data());
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      absmax = std::max(absmax, std::fabs(row[i]));
      finite = finite && std::isfinite(row[i]);
    }
    const float sx = absmax / 127.0f;
    if (!finite || !(sx > 0.0f)) {
      // Zero row (or one so tiny that its scale underflows): every term is zero. Non-finite row: NaN scales
      // make every output NaN, as a matmul would.
      const float s = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      buf.sh[r] = buf.sl[r] = s;
      continue;
    }
    for (int64_t i = 0; i < k; ++i) {
      t[i] = row[i] / sx;
      hi[i] = std::min(127.0f, std::max(-127.0f, round_even(t[i])));
      lo[i] = std::min(127.0f, std::max(-127.0f, round_even((t[i] - hi[i]) * kLowSteps)));
    }
    int32_t sum_h = 0, sum_l = 0;
    for (int64_t i = 0; i < k; ++i) {
      const int32_t h = static_cast<int32_t>(hi[i]), l = passes == 2 ? static_cast<int32_t>(lo[i]) : 0;
      sum_h += h;
      sum_l += l;
      const int64_t at = ((i >> 2) * m + r) * passes * kInt8Group + (i & 3);
      if (narrow) {
        buf.narrow[at] = static_cast<int8_t>(h);
        if (passes == 2) buf.narrow[at + kInt8Group] = static_cast<int8_t>(l);
      } else {
        buf.wide[at] = static_cast<int16_t>(h);
        if (passes == 2) buf.wide[at + kInt8Group] = static_cast<int16_t>(l);
      }
    }
    buf.sh[r] = sx;
    buf.sl[r] = sx / kLowSteps;
    buf.sumh[r] = sum_h;
    buf.suml[r] = sum_l;
  }
  p.x8 = buf.narrow.data();
  p.x16 = buf.wide.data();
  p.sh = buf.sh.data();
  p.sl = buf.sl.data();
  p.sumh = buf.sumh.data();
  p.suml = buf.suml.data();
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cpu_linear_pack(const at::Tensor& weight, std::string_view kind_name) {
  const Kind kind = parse_kind(kind_name);
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                  weight.scalar_type() == at::kHalf,
              "weight must be float32, bfloat16 or float16, got ", weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n >= 1 && k >= 1, "weight must have at least one row and one column, got shape ", weight.sizes());
  TORCH_CHECK(kind == Kind::bf16 || k <= kMaxInt8K, "int8 weights need K <= ", kMaxInt8K, " (int32 sums), got K = ", k);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* src = w.const_data_ptr<float>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t group = kind == Kind::bf16 ? kBf16Group : kInt8Group;
  const int64_t groups = (k + group - 1) / group;
  const int64_t per_block = groups * kBlock * group;  // elements of one packed block

  if (kind == Kind::bf16) {
    at::Tensor packed = at::empty({blocks, groups, kBlock, group}, weight.options().dtype(at::kBFloat16));
    uint16_t* dst = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<at::BFloat16>());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t g = 0; g < groups; ++g) {
          for (int64_t j = 0; j < kBlock; ++j) {
            for (int64_t e = 0; e < group; ++e) {
              const int64_t row = b * kBlock + j, col = g * group + e;
              dst[b * per_block + (g * kBlock + j) * group + e] = row < n && col < k ? bf16_bits(src[row * k + col]) : 0;
            }
          }
        }
      }
    });
    return {packed, at::empty({0}, weight.options().dtype(at::kFloat))};
  }

  // int8: scale = absmax / 127 per output channel, q = round(w / scale) in [-127, 127], stored as q + 128.
  at::Tensor scale = at::empty({n}, weight.options().dtype(at::kFloat));
  float* scales = scale.mutable_data_ptr<float>();
  at::Tensor packed = at::empty({blocks, groups, kBlock, group}, weight.options().dtype(at::kByte));
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t row = b * kBlock + j;
        float s = 0.0f;
        if (row < n) {
          float absmax = 0.0f;
          for (int64_t col = 0; col < k; ++col) {
            const float v = src[row * k + col];
            TORCH_CHECK(std::isfinite(v), "weight must be finite, got ", v, " at [", row, ", ", col, "]");
            absmax = std::max(absmax, std::fabs(v));
          }
          s = absmax / 127.0f;
          scales[row] = s;
        }
        for (int64_t g = 0; g < groups; ++g) {
          for (int64_t e = 0; e < group; ++e) {
            const int64_t col = g * group + e;
            float q = 0.0f;
            if (row < n && col < k && s > 0.0f) {
              q = std::min(127.0f, std::max(-127.0f, std::nearbyint(src[row * k + col] / s)));
            }
            dst[b * per_block + (g * kBlock + j) * group + e] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
          }
        }
      }
    }
  });
  return {packed, scale};
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                      int64_t out_features, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, bool gelu, std::string_view isa_name_arg,
                      int64_t x_passes) {
  check_cpu(x, "x");
  check_cpu(packed, "packed");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension [..., K], got a 0-D tensor");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 || packed.scalar_type() == at::kByte,
              "packed must come from cpu_linear_pack (bfloat16 or uint8), got ", packed.scalar_type());
  const Kind kind = packed.scalar_type() == at::kBFloat16 ? Kind::bf16 : Kind::int8;
  const int64_t group = kind == Kind::bf16 ? kBf16Group : kInt8Group;
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == group && packed.is_contiguous(),
              "packed must be a contiguous [blocks, groups, ", kBlock, ", ", group, "] tensor from cpu_linear_pack, got shape ",
              packed.sizes());
  const int64_t k = x.size(-1), kp = packed.size(1) * group, n = out_features;
  TORCH_CHECK(k >= 1 && (k + group - 1) / group == packed.size(1), "x has K = ", k,
              " input features but packed holds weights for K in (", kp - group, ", ", kp, "]");
  TORCH_CHECK(n >= 1 && (n + kBlock - 1) / kBlock == packed.size(0), "out_features = ", n,
              " does not match packed, which holds ", packed.size(0), " blocks of ", kBlock, " columns");
  if (kind == Kind::int8) {
    TORCH_CHECK(scale.has_value(), "scale is required with int8 weights (the second output of cpu_linear_pack)");
    check_cpu(*scale, "scale");
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->size(0) == n,
                "scale must be float32 [N] = [", n, "], got ", scale->scalar_type(), " ", scale->sizes());
  } else {
    TORCH_CHECK(!scale.has_value() || scale->numel() == 0, "scale must be None with bf16 weights");
  }
  const Isa isa = parse_isa(kind, isa_name_arg);
  TORCH_CHECK(kind == Kind::int8 ? (x_passes == 1 || x_passes == 2) : x_passes == 2,
              "x_passes must be 1 or 2 with int8 weights (2, the default, with bf16 weights), got ", x_passes);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const at::Tensor x2d = x.reshape({-1, k});
  const at::Tensor xc = x2d.stride(1) == 1 ? x2d : x2d.contiguous();
  const int64_t m = xc.size(0);

  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [N] = [", n, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == x.scalar_type(),
                "bias must be float32 or x's dtype (", x.scalar_type(), "), got ", bias->scalar_type());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor res;
  if (residual.has_value()) {
    check_cpu(*residual, "residual");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype (", x.scalar_type(),
                "), got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "residual must have the output shape ",
                at::IntArrayRef(out_shape), ", got ", residual->sizes());
    res = residual->reshape({m, n}).contiguous();
  }

  at::Tensor out = at::empty(out_shape, x.options());
  if (m == 0) return out;
  // GELU is applied by ATen's vectorised kernel on the fp32 sums before the single rounding, so the residual
  // comes after it, outside the kernel.
  at::Tensor acc = gelu ? at::empty({m, n}, x.options().dtype(at::kFloat)) : out;

  Problem p;
  p.m = m;
  p.n = n;
  p.kp = kp;
  p.passes = static_cast<int>(x_passes);
  p.w = packed.const_data_ptr();
  p.wscale = kind == Kind::int8 ? scale->const_data_ptr<float>() : nullptr;
  p.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  p.residual = res.defined() && !gelu ? res.const_data_ptr() : nullptr;
  p.out = acc.mutable_data_ptr();
  p.out_bf16 = acc.scalar_type() == at::kBFloat16;
  std::vector<uint16_t> bf16_bits_buf;
  std::vector<float> bf16_values_buf;
  Int8Activations int8_buf;
  if (kind == Kind::bf16) {
    prepare_bf16(xc, kp, isa, p, bf16_bits_buf, bf16_values_buf);
  } else {
    prepare_int8(xc, kp, isa, p, int8_buf);
  }

  const Kernel kernel = kernel_for(kind, isa, p.passes);
  const int64_t blocks = packed.size(0);
  const int64_t block_bytes = kp * kBlock * packed.element_size();
  // At least ~64 KB of weights per thread, so small matrices do not pay for waking the pool.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { run_blocks(p, kernel, block_bytes, b0, b1); });

  if (gelu) {
    at::gelu_(acc);
    if (res.defined()) acc.add_(res);
    out.view({m, n}).copy_(acc);
  }
  return out;
}

std::string cpu_linear_isas(std::string_view kind) { return supported_list(parse_kind(kind)); }

}  // namespace enginepy
