// Declarations of the per-ISA CPU Gaussian block generators and the runtime ISA choice.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mmfast {
namespace cpu {

// Identifies one noise stream: the Philox key comes from `seed`; `position` and `step` fill the
// high counter words; the low counter word walks the tensor (see philox.h for the layout).
struct NoiseStream {
  uint64_t seed;
  uint64_t step;
  uint32_t position;
};

// Writes the kNoiseBlockElems standard normals of noise block `block` (block index within the
// tensor) to `out`, which must hold kNoiseBlockElems floats.
using GaussianBlockFn = void (*)(const NoiseStream& stream, uint32_t block, float* out);

// One definition per translation unit, each compiled for its own instruction set with
// -ffast-math (only there: glibc's vector logf/cosf are used under it, and nothing in these
// functions needs NaN semantics).
void gaussian_block_generic(const NoiseStream& stream, uint32_t block, float* out);
#if defined(MMFAST_HAVE_AVX2)
void gaussian_block_avx2(const NoiseStream& stream, uint32_t block, float* out);
#endif
#if defined(MMFAST_HAVE_AVX512)
void gaussian_block_avx512(const NoiseStream& stream, uint32_t block, float* out);
#endif

// The generator picked for this CPU (overridable with MMFAST_CPU_ISA or set_cpu_isa).
GaussianBlockFn gaussian_block_fn();
std::string cpu_isa();
std::vector<std::string> cpu_isas_available();
void set_cpu_isa(const std::string& isa);

}  // namespace cpu
}  // namespace mmfast
