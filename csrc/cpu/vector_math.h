// CPU vector-math kernels compiled once per instruction set (generic, AVX2+FMA, AVX-512), with
// -ffast-math confined to those translation units so GCC vectorises logf/cosf/expf through glibc's
// libmvec (the noise kernel: ~28 ms vs ~127 ms scalar for two ResNet-18s' conv gradients, 2 cores,
// AVX-512). The variant is chosen at run time by CPUID
// (isa.cpp), so a wheel built on one machine runs on any x86-64 CPU.
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

struct VectorMath {
  const char* isa;
  // Writes the kNoiseBlockElems standard normals of noise block `block` (block index within the
  // tensor) to `out`, which holds kNoiseBlockElems floats.
  void (*gaussian_block)(const NoiseStream& stream, uint32_t block, float* out);
  // sum_i exp(x[i] - shift) over n finite-or-(-inf) floats, shift finite (a row's max).
  float (*exp_sum)(const float* x, int64_t n, float shift);
};

extern const VectorMath kVectorMathGeneric;
#if defined(MMFAST_HAVE_AVX2)
extern const VectorMath kVectorMathAvx2;
#endif
#if defined(MMFAST_HAVE_AVX512)
extern const VectorMath kVectorMathAvx512;
#endif

// The variant picked for this CPU (overridable with MMFAST_CPU_ISA or set_cpu_isa).
const VectorMath& vector_math();
std::string cpu_isa();
std::vector<std::string> cpu_isas_available();
void set_cpu_isa(const std::string& isa);

}  // namespace cpu
}  // namespace mmfast
