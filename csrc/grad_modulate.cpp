#include "grad_modulate.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "philox.h"

namespace mmfast {

void check_grad_modulate_args(const char* op, at::TensorList grads, const at::Tensor& coeffs,
                              c10::IntArrayRef modality_index, int64_t step, double eps) {
  TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kFloat, op, ": coeffs must be float32, got ",
                   coeffs.scalar_type());
  TORCH_CHECK_VALUE(coeffs.dim() == 1 && coeffs.numel() > 0, op,
                    ": coeffs must be a non-empty 1-D tensor (one coefficient per modality), got shape ",
                    coeffs.sizes());
  TORCH_CHECK_VALUE(coeffs.is_contiguous(), op, ": coeffs must be contiguous");
  TORCH_CHECK_VALUE(modality_index.size() == grads.size(), op, ": modality_index has ",
                    modality_index.size(), " entries but grads has ", grads.size(),
                    " tensors (one modality per gradient)");
  TORCH_CHECK_VALUE(step >= 0, op, ": step must be >= 0, got ", step);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(grads.size() < (size_t(1) << 31), op, ": too many gradient tensors");
  const int64_t num_modalities = coeffs.numel();
  std::vector<std::pair<const void*, size_t>> storages;
  storages.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), op, ": grads[", i, "] is undefined (None)");
    const auto dtype = g.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": grads[", i, "] has dtype ", dtype, "; expected float32, float16 or bfloat16");
    TORCH_CHECK_VALUE(g.device() == coeffs.device(), op, ": grads[", i, "] is on ", g.device(),
                      " but coeffs is on ", coeffs.device(),
                      "; coeffs must live on the gradients' device");
    TORCH_CHECK_VALUE(g.is_contiguous(), op, ": grads[", i, "] (shape ", g.sizes(),
                      ") is not contiguous; pass .contiguous() gradients");
    TORCH_CHECK_VALUE(g.numel() <= kMaxNoiseElems, op, ": grads[", i, "] has ", g.numel(),
                      " elements; at most ", kMaxNoiseElems, " are supported");
    const int64_t m = modality_index[i];
    TORCH_CHECK_VALUE(m >= 0 && m < num_modalities, op, ": modality_index[", i, "] = ", m,
                      " is out of range [0, ", num_modalities, ")");
    if (g.numel() > 0) storages.emplace_back(g.data_ptr(), i);
  }
  // The same memory twice would be modulated twice, racing with itself.
  std::sort(storages.begin(), storages.end());
  for (size_t j = 1; j < storages.size(); ++j) {
    TORCH_CHECK_VALUE(storages[j].first != storages[j - 1].first, op, ": grads[",
                      storages[j - 1].second, "] and grads[", storages[j].second,
                      "] share memory; each gradient may appear once");
  }
}

void check_gaussian_noise_args(const at::Tensor& out, int64_t step, int64_t position) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "gaussian_noise_: out must be float32");
  TORCH_CHECK_VALUE(out.is_contiguous(), "gaussian_noise_: out must be contiguous");
  TORCH_CHECK_VALUE(out.numel() <= kMaxNoiseElems, "gaussian_noise_: out is too large");
  TORCH_CHECK_VALUE(step >= 0 && position >= 0 && position < (int64_t(1) << 32),
                    "gaussian_noise_: step must be >= 0 and position in [0, 2^32)");
}

std::vector<Chunk> plan_chunks(at::TensorList grads, std::vector<int64_t>* first_chunk) {
  std::vector<Chunk> chunks;
  first_chunk->assign(grads.size() + 1, 0);
  for (size_t t = 0; t < grads.size(); ++t) {
    (*first_chunk)[t] = static_cast<int64_t>(chunks.size());
    const int64_t n = grads[t].numel();
    for (int64_t b = 0; b < n; b += kChunkElems) {
      chunks.push_back(Chunk{static_cast<int64_t>(t), b, std::min(n, b + kChunkElems)});
    }
  }
  (*first_chunk)[grads.size()] = static_cast<int64_t>(chunks.size());
  return chunks;
}

}  // namespace mmfast
