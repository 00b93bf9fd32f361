// Op schemas (torch custom ops, so they dispatch on device and trace under torch.compile) and the
// small pybind11 module mmfast._C that reports how the extension was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/vector_math.h"

#ifndef MMFAST_WITH_CUDA
#define MMFAST_WITH_CUDA 0
#endif
#ifndef MMFAST_VERSION
#define MMFAST_VERSION "unknown"
#endif
#ifndef MMFAST_CUDA_ARCH_LIST
#define MMFAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(mmfast, m) {
  // OGM-GE gradient modulation, in place: g <- coeffs[m] * g + N(0, (std(g) + eps)^2).
  m.def(
      "grad_modulate_(Tensor(a!)[] grads, Tensor coeffs, int[] modality_index, bool noise=True, "
      "int seed=0, int step=0, float eps=1e-08) -> ()");
  // The standard-normal stream grad_modulate_ uses for (seed, step, position), for tests.
  m.def("gaussian_noise_(Tensor(a!) out, int seed, int step, int position) -> ()");
  // Modality discrepancy (CPU kernels; CUDA runs the Triton kernels of mmfast.kernels):
  // per-sample true-class probabilities s [M, B] and per-modality partial sums [M, 1] ...
  m.def("modality_scores(Tensor logits, Tensor labels, Tensor? mask) -> (Tensor, Tensor)");
  // ... and from partial sums (or rho) the rows S, rho, OGM k, OPM q of a [4, M] tensor.
  m.def(
      "balance_coefficients(Tensor input, bool input_is_rho, int kind, int form, int z, float alpha, "
      "float q_base, float lam) -> Tensor");
}

#if !MMFAST_WITH_CUDA
// torch may have CUDA while this build has no CUDA kernels (no nvcc at build time): say so.
namespace {
[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false, "mmfast was built without CUDA kernels (no nvcc, or MMFAST_WITH_CUDA=0 at build "
                     "time); rebuild it with nvcc on PATH to use CUDA tensors");
}
void grad_modulate_no_cuda(at::TensorList, const at::Tensor&, c10::IntArrayRef, bool, int64_t, int64_t,
                           double) {
  no_cuda_kernels();
}
void gaussian_noise_no_cuda(const at::Tensor&, int64_t, int64_t, int64_t) { no_cuda_kernels(); }
}  // namespace
TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("grad_modulate_", &grad_modulate_no_cuda);
  m.impl("gaussian_noise_", &gaussian_noise_no_cuda);
}
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfast native extension: fused gradient-modulation ops (CPU and CUDA).";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = MMFAST_VERSION;
    info["cuda"] = static_cast<bool>(MMFAST_WITH_CUDA);
#if MMFAST_WITH_CUDA
    info["cuda_arch_list"] = std::string(MMFAST_CUDA_ARCH_LIST);
#else
    info["cuda_arch_list"] = py::none();
#endif
    info["torch_version"] = TORCH_VERSION;
    info["cpu_isa"] = mmfast::cpu::cpu_isa();
    info["cpu_isas"] = mmfast::cpu::cpu_isas_available();
    info["parallel_backend"] = AT_PARALLEL_OPENMP ? "openmp" : "native";
    info["num_threads"] = at::get_num_threads();
    return info;
  }, "How the extension was built and what it runs with.");
  m.def("set_cpu_isa", &mmfast::cpu::set_cpu_isa, py::arg("isa"),
        "Pick the CPU noise generator: 'avx512', 'avx2' or 'generic' (for tests and benchmarks).");
}
