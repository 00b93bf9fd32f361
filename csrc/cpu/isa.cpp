// Run-time choice among the vector-math variants compiled for several instruction sets.
// MMFAST_CPU_ISA=generic|avx2|avx512 overrides the CPUID choice (for tests and benchmarks).
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#include "vector_math.h"

namespace mmfast {
namespace cpu {
namespace {

struct IsaEntry {
  const VectorMath* table;
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
    {&kVectorMathAvx512, &has_avx512},
#endif
#if defined(MMFAST_HAVE_AVX2)
    {&kVectorMathAvx2, &has_avx2},
#endif
    {&kVectorMathGeneric, &always},
};

const IsaEntry* find_isa(const std::string& name) {
  for (const IsaEntry& e : kIsas) {
    if (name == e.table->isa) return &e;
  }
  return nullptr;
}

const VectorMath* initial_table() {
  if (const char* env = std::getenv("MMFAST_CPU_ISA")) {
    const IsaEntry* e = find_isa(env);
    TORCH_CHECK_VALUE(e != nullptr && e->supported(), "MMFAST_CPU_ISA=", env,
                      " is not one of the instruction sets usable here");
    return e->table;
  }
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) return e.table;
  }
  return &kVectorMathGeneric;
}

std::atomic<const VectorMath*>& current() {
  static std::atomic<const VectorMath*> table{initial_table()};
  return table;
}

}  // namespace

const VectorMath& vector_math() { return *current().load(std::memory_order_relaxed); }

std::string cpu_isa() { return vector_math().isa; }

std::vector<std::string> cpu_isas_available() {
  std::vector<std::string> names;
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) names.emplace_back(e.table->isa);
  }
  return names;
}

void set_cpu_isa(const std::string& isa) {
  const IsaEntry* e = find_isa(isa);
  TORCH_CHECK_VALUE(e != nullptr && e->supported(), "set_cpu_isa: '", isa,
                    "' is not one of the instruction sets usable here");
  current().store(e->table);
}

}  // namespace cpu
}  // namespace mmfast
