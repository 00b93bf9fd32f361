// Run-time choice among the Gaussian block generators compiled for several instruction sets.
// Wheels must run on any x86-64 machine, so the AVX-512/AVX2 variants are picked here by CPUID
// rather than with -march=native at build time. MMFAST_CPU_ISA=generic|avx2|avx512 overrides.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#include "gaussian_block.h"

namespace mmfast {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  GaussianBlockFn fn;
  bool (*supported)();
};

bool always() { return true; }
#if defined(MMFAST_HAVE_AVX2)
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
#if defined(MMFAST_HAVE_AVX512)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}
#endif

// Best first.
const IsaEntry kIsas[] = {
#if defined(MMFAST_HAVE_AVX512)
    {"avx512", &gaussian_block_avx512, &has_avx512},
#endif
#if defined(MMFAST_HAVE_AVX2)
    {"avx2", &gaussian_block_avx2, &has_avx2},
#endif
    {"generic", &gaussian_block_generic, &always},
};

const IsaEntry* find_isa(const std::string& name) {
  for (const IsaEntry& e : kIsas) {
    if (name == e.name) return &e;
  }
  return nullptr;
}

const IsaEntry* initial_isa() {
  if (const char* env = std::getenv("MMFAST_CPU_ISA")) {
    const IsaEntry* e = find_isa(env);
    TORCH_CHECK_VALUE(e != nullptr && e->supported(), "MMFAST_CPU_ISA=", env,
                      " is not one of the instruction sets usable here");
    return e;
  }
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) return &e;
  }
  return &kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
}

std::atomic<const IsaEntry*>& current() {
  static std::atomic<const IsaEntry*> isa{initial_isa()};
  return isa;
}

}  // namespace

GaussianBlockFn gaussian_block_fn() { return current().load(std::memory_order_relaxed)->fn; }

std::string cpu_isa() { return current().load()->name; }

std::vector<std::string> cpu_isas_available() {
  std::vector<std::string> names;
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) names.emplace_back(e.name);
  }
  return names;
}

void set_cpu_isa(const std::string& isa) {
  const IsaEntry* e = find_isa(isa);
  TORCH_CHECK_VALUE(e != nullptr && e->supported(), "set_cpu_isa: '", isa,
                    "' is not one of the instruction sets usable here");
  current().store(e);
}

}  // namespace cpu
}  // namespace mmfast
