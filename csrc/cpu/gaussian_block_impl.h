// Body of the blocked Philox + Box-Muller generator. Included once per ISA translation unit with
// MMFAST_GAUSSIAN_BLOCK_FN naming the function; built with -ffast-math so that GCC vectorises
// logf/cosf through glibc's libmvec (../shared/notes/cpu-gaussian-noise.md).
#include <cmath>

#include "../philox.h"
#include "gaussian_block.h"

namespace mmfast {
namespace cpu {

void MMFAST_GAUSSIAN_BLOCK_FN(const NoiseStream& stream, uint32_t block, float* __restrict out) {
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

}  // namespace cpu
}  // namespace mmfast
