// Counter-based Philox4x32-10, the Gaussian noise layout and the std formula shared by the CPU and CUDA kernels.
//
// The noise value of element e of tensor `position` depends only on (seed, step, position, e):
// never on thread count, grid layout or device. Both backends include this header, so they
// draw the same stream by construction. The slow reference is mmfast/ops/grad_modulation.py.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MMFAST_HD __host__ __device__ __forceinline__
#else
#define MMFAST_HD inline
#endif

namespace mmfast {

// Noise layout: elements are grouped in blocks of kNoiseBlockElems = 4 * kCountersPerBlock.
// Philox counter j of block b yields four uint32 words -> two Box-Muller pairs -> four normals,
// stored lane-major: element b*1024 + lane*256 + j comes from counter b*256 + j, lane `lane`.
// Lane-major keeps CPU stores contiguous (vectorisable) and CUDA stores coalesced.
constexpr int64_t kCountersPerBlock = 256;
constexpr int64_t kNoiseBlockElems = 4 * kCountersPerBlock;
// Work unit of both backends (a multiple of the noise block): one OpenMP task / one CUDA block.
constexpr int64_t kChunkElems = 16 * kNoiseBlockElems;
// The per-tensor counter is 32 bits wide.
constexpr int64_t kMaxNoiseElems = (int64_t(1) << 32) * 4;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxKey {
  uint32_t k0, k1;
};

MMFAST_HD PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// One Philox4x32 round on (c0..c3) with key (k0, k1), as in Salmon et al. (SC'11).
MMFAST_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                            uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n1 = static_cast<uint32_t>(p1);
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  const uint32_t n3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c1 = n1;
  c2 = n2;
  c3 = n3;
}

// Philox4x32-10: ten rounds, the key bumped by the Weyl constants between rounds.
MMFAST_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// uint32 -> uniform in (0, 1): x * 2^-32 + 2^-33, so log() never sees 0 (same as curand).
MMFAST_HD float uniform_open01(uint32_t x) {
  return static_cast<float>(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// Unbiased std (as torch.std) from float64 sums of (x - shift) and (x - shift)^2 over n elements,
// plus eps, as float. n < 2 gives NaN, as torch.std does; NaN/Inf inputs give NaN.
MMFAST_HD float std_plus_eps(double sum, double sum_sq, int64_t n, double eps) {
  const double dn = static_cast<double>(n);
  double var = (sum_sq - sum * sum / dn) / (dn - 1.0);
  var = var < 0.0 ? 0.0 : var;  // rounding can leave a tiny negative; NaN passes through
  return static_cast<float>(sqrt(var) + eps);
}

constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kHalfPi = 1.57079632679489661923f;

// The four Philox words of noise counter `counter` of the stream (seed, step, position):
// counter = (counter, position, step_lo, step_hi), key = (seed_lo, seed_hi).
MMFAST_HD void noise_words(PhiloxKey key, uint32_t counter, uint32_t position, uint64_t step,
                           uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3) {
  x0 = counter;
  x1 = position;
  x2 = static_cast<uint32_t>(step);
  x3 = static_cast<uint32_t>(step >> 32);
  philox4x32_10(x0, x1, x2, x3, key);
}

// Box-Muller on the pairs (x0, x1) and (x2, x3): radius from the first word, angle from the
// second; lanes (r cos t, r sin t). sin(t) is written cos(t - pi/2) so that GCC does not fuse
// sinf/cosf into sincosf, which has no vector variant (CPU path), and both devices agree.
MMFAST_HD void box_muller4(uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, float& z0, float& z1,
                           float& z2, float& z3) {
  const float r01 = sqrtf(-2.0f * logf(uniform_open01(x0)));
  const float t01 = kTwoPi * uniform_open01(x1);
  const float r23 = sqrtf(-2.0f * logf(uniform_open01(x2)));
  const float t23 = kTwoPi * uniform_open01(x3);
  z0 = r01 * cosf(t01);
  z1 = r01 * cosf(t01 - kHalfPi);
  z2 = r23 * cosf(t23);
  z3 = r23 * cosf(t23 - kHalfPi);
}

}  // namespace mmfast
