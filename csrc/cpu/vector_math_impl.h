// Bodies of the per-ISA vector-math kernels. Included once per ISA translation unit, with
// MMFAST_ISA_NAME (a string) and MMFAST_ISA_TABLE (the VectorMath object to define); built with
// -ffast-math. Nothing here needs NaN semantics: the noise works on integers, and exp_sum's
// callers handle NaN/Inf rows before calling it.
#include <cmath>

#include "../philox.h"
#include "vector_math.h"

namespace mmfast {
namespace cpu {
namespace {

void gaussian_block(const NoiseStream& stream, uint32_t block, float* __restrict out) {
  constexpr int kN = static_cast<int>(kCountersPerBlock);
  alignas(64) uint32_t x0[kN], x1[kN], x2[kN], x3[kN];
  const PhiloxKey key = philox_key(stream.seed);
  const uint32_t base = block * static_cast<uint32_t>(kCountersPerBlock);
  // Pass 1: Philox over a block of counters, structure of arrays, so it vectorises.
#pragma omp simd
  for (int j = 0; j < kN; ++j) {
    noise_words(key, base + static_cast<uint32_t>(j), stream.position, stream.step, x0[j], x1[j], x2[j],
                x3[j]);
  }
  // Pass 2: Box-Muller with lane-major stores (contiguous, so they vectorise).
#pragma omp simd
  for (int j = 0; j < kN; ++j) {
    box_muller4(x0[j], x1[j], x2[j], x3[j], out[j], out[kN + j], out[2 * kN + j], out[3 * kN + j]);
  }
}

float exp_sum(const float* __restrict x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += expf(x[i] - shift);
  return s;
}

}  // namespace

extern const VectorMath MMFAST_ISA_TABLE{MMFAST_ISA_NAME, &gaussian_block, &exp_sum};

}  // namespace cpu
}  // namespace mmfast
