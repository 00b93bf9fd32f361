// Op schemas (torch custom ops, so they dispatch on device and trace under torch.compile) and the
// small pybind11 module mmfast._C that reports how the extension was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
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
#ifndef MMFAST_CUDA_ARCH_SOURCE
#define MMFAST_CUDA_ARCH_SOURCE ""
#endif

TORCH_LIBRARY(mmfast, m) {
  // OGM-GE gradient modulation, in place: g <- coeffs[m] * g + N(0, (std(g) + eps)^2).
  // The noise key and counter are the ints seed/step, or 0-dim int64 tensors seed_tensor /
  // step_tensor read on the device (step_tensor += 1 afterwards with increment_step).
  m.def(
      "grad_modulate_(Tensor(a!)[] grads, Tensor coeffs, int[] modality_index, bool noise=True, "
      "int seed=0, int step=0, float eps=1e-08, Tensor? seed_tensor=None, Tensor(b!)? step_tensor=None, "
      "bool increment_step=False) -> ()");
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

// Autograd bookkeeping of the in-place ops, from their schemas: every argument annotated
// (a!) is written. torch's generic fallbacks bump versions of mutated *returns* only, and these
// ops return nothing, so they get these two boxed kernels instead.
namespace {

// Calls fn(tensor, argument index, position in its list or -1) for every written tensor.
template <typename F>
void for_each_written_tensor(const c10::OperatorHandle& op, const torch::jit::Stack& stack, F fn) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  for (size_t i = 0; i < n; ++i) {
    if (!schema.is_mutable({c10::SchemaArgType::input, i})) continue;
    const c10::IValue& v = stack[stack.size() - n + i];
    if (v.isTensor()) {
      fn(v.toTensor(), i, int64_t(-1));
    } else if (v.isTensorList()) {
      const c10::List<at::Tensor> list = v.toTensorList();
      for (size_t j = 0; j < list.size(); ++j) fn(list.get(j), i, static_cast<int64_t>(j));
    }  // (None for an optional tensor: nothing written)
  }
}

// Autograd: the ops have no derivative, so a written tensor that requires grad would silently
// leave autograd with a wrong graph: refuse it, naming it (gradients do not require grad).
void refuse_tensors_requiring_grad(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for_each_written_tensor(op, *stack, [&](const at::Tensor& t, size_t arg, int64_t j) {
      TORCH_CHECK(!(t.defined() && t.requires_grad()), op.schema().name(), ": ",
                  op.schema().arguments()[arg].name(), j >= 0 ? "[" + std::to_string(j) + "]" : std::string(),
                  " requires grad, but this op writes it in place and has no derivative; pass gradients "
                  "(p.grad, which do not require grad) or call it under torch.no_grad()");
    });
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView: bump the version counter of every written tensor, as torch's in-place ops do,
// so that autograd refuses a modulated tensor it saved for backward instead of computing a wrong
// gradient silently.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  std::vector<at::Tensor> written;
  for_each_written_tensor(op, *stack, [&](const at::Tensor& t, size_t, int64_t) {
    if (t.defined()) written.push_back(t);
  });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, Autograd, m) {
  m.impl("grad_modulate_", torch::CppFunction::makeFromBoxedFunction<&refuse_tensors_requiring_grad>());
  m.impl("gaussian_noise_", torch::CppFunction::makeFromBoxedFunction<&refuse_tensors_requiring_grad>());
}
TORCH_LIBRARY_IMPL(mmfast, ADInplaceOrView, m) {
  m.impl("grad_modulate_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("gaussian_noise_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

#if !MMFAST_WITH_CUDA
// torch may have CUDA while this build has no CUDA kernels (no nvcc at build time): say so.
namespace {
[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false, "mmfast was built without CUDA kernels (no nvcc, or MMFAST_WITH_CUDA=0 at build "
                     "time); rebuild it with nvcc on PATH to use CUDA tensors");
}
void grad_modulate_no_cuda(at::TensorList, const at::Tensor&, c10::IntArrayRef, bool, int64_t, int64_t,
                           double, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool) {
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
    info["cuda_arch_source"] = std::string(MMFAST_CUDA_ARCH_SOURCE);
#else
    info["cuda_arch_list"] = py::none();
    info["cuda_arch_source"] = py::none();
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
