// CPU kernels of the modality-discrepancy ops, mirroring the two Triton kernels
// (kernels/modality_scores.py, kernels/balance_coefficients.py); the formulas are stated for
// users in mmfast/ops/balance.py. One call each, so a step pays two op dispatches instead of the
// few dozen small PyTorch ops of the vectorised path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "vector_math.h"

namespace mmfast {
namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// softmax(x)[label] for one row of C float32 logits. NaN when the row holds a NaN or has no finite
// maximum (all -inf, or a +inf), which is what the softmax formula gives.
float true_class_probability(const float* x, int64_t C, int64_t label, const VectorMath& vm) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    nan |= std::isnan(x[c]);
    top = x[c] > top ? x[c] : top;
  }
  if (nan || !std::isfinite(top)) return kNaN;
  return std::exp(x[label] - top) / vm.exp_sum(x, C, top);
}

std::tuple<at::Tensor, at::Tensor> modality_scores_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& mask) {
  const char* op = "modality_scores";
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(0) >= 2 && logits.size(1) >= 1 && logits.size(2) >= 1,
                    op, ": logits must be [M >= 2, B >= 1, C >= 1], got ", logits.sizes());
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, op, ": labels must have shape [", B, "], got ",
                    labels.sizes());
  const at::Tensor y = labels.contiguous();
  const int64_t* py = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(py[i] >= 0 && py[i] < C, op, ": labels[", i, "] = ", py[i], " is out of range [0, ", C,
                      ") for C=", C, " classes");
  }
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kFloat, op, ": mask must be float32 here");
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == M && mask->size(1) == B, op,
                      ": mask must be [M, B], got ", mask->sizes());
  }

  const at::Tensor x = logits.contiguous();
  at::Tensor s = at::empty({M, B}, logits.options().dtype(at::kFloat));
  float* ps = s.data_ptr<float>();
  const VectorMath& vm = vector_math();
  const int64_t grain = std::max<int64_t>(1, 16384 / C);  // small batches stay on one thread
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_scores_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, M * B, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> row(std::is_same_v<scalar_t, float> ? 0 : C);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* src = px + r * C;
        const float* xr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          xr = reinterpret_cast<const float*>(src);
        } else {
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<float>(src[c]);
          xr = row.data();
        }
        ps[r] = true_class_probability(xr, C, py[r % B], vm);
      }
    });
  });

  // Batch scores in a fixed order (deterministic); masked-out samples are skipped, not multiplied,
  // so a NaN score there cannot leak in.
  at::Tensor partial = at::empty({M, 1}, s.options());
  float* pp = partial.data_ptr<float>();
  const float* pw = mask.has_value() ? mask->data_ptr<float>() : nullptr;
  const int64_t wm = mask.has_value() ? mask->stride(0) : 0, wb = mask.has_value() ? mask->stride(1) : 0;
  for (int64_t m = 0; m < M; ++m) {
    double acc = 0.0;
    for (int64_t i = 0; i < B; ++i) {
      const float w = pw != nullptr ? pw[m * wm + i * wb] : 1.0f;  // strides: a [B] mask expands to [M, B]
      if (w != 0.0f) acc += static_cast<double>(w) * ps[m * B + i];
    }
    pp[m] = static_cast<float>(acc);
  }
  return {s, partial};
}

float z_fn(float x, int64_t z) { return z == 0 ? std::tanh(x - 1.0f) : 1.0f / (1.0f + std::exp(-x)); }

at::Tensor balance_coefficients_cpu(const at::Tensor& input, bool input_is_rho, int64_t kind, int64_t form,
                                    int64_t z, double alpha_d, double q_base_d, double lam_d) {
  const char* op = "balance_coefficients";
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, op, ": input must be float32");
  TORCH_CHECK_VALUE(input_is_rho ? input.dim() == 1 : input.dim() == 2, op, ": input must be ",
                    input_is_rho ? "rho [M]" : "partial sums [M, NB]", ", got ", input.sizes());
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 1 && form >= 0 && form <= 2 && z >= 0 && z <= 1, op,
                    ": bad kind/form/z code");
  const int64_t M = input.size(0);
  TORCH_CHECK_VALUE(M >= 1 && (input_is_rho || M >= 2), op, ": needs at least 2 modalities");
  const at::Tensor in = input.contiguous();
  const float* pin = in.data_ptr<float>();
  const float alpha = static_cast<float>(alpha_d), q_base = static_cast<float>(q_base_d);
  const float lam = static_cast<float>(lam_d);
  at::Tensor out = at::empty({4, M}, input.options());
  float* S = out.data_ptr<float>();
  float* rho = S + M;
  float* k = S + 2 * M;
  float* q = S + 3 * M;
  if (input_is_rho) {
    for (int64_t m = 0; m < M; ++m) {
      S[m] = 0.0f;
      rho[m] = pin[m];
    }
  } else {
    const int64_t NB = in.size(1);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < NB; ++b) acc += pin[m * NB + b];
      S[m] = acc;
    }
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t j = 0; j < M; ++j) {
        if (j != m) acc += kind == 0 ? S[m] / S[j] : S[m] - S[j];
      }
      rho[m] = acc / static_cast<float>(M - 1);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float r = rho[m];  // NaN compares false: nothing modulated
    if (form == 0) {
      k[m] = r > 1.0f ? std::max(1.0f - alpha * z_fn(r, z), 0.0f) : 1.0f;
    } else if (form == 1) {
      k[m] = r > 1.0f ? 1.0f - std::tanh(alpha * r) : 1.0f;
    } else {
      k[m] = r < 1.0f ? 1.0f + alpha * z_fn(1.0f / r, z) : 1.0f;
    }
    q[m] = r > 1.0f ? std::min(std::max(q_base * (1.0f + lam * z_fn(r, z)), 0.0f), 1.0f) : 0.0f;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("modality_scores", &modality_scores_cpu);
  m.impl("balance_coefficients", &balance_coefficients_cpu);
}

}  // namespace cpu
}  // namespace mmfast
