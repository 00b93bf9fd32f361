#include "grad_modulate.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "philox.h"

namespace mmfast {
namespace {

// A 0-dim int64 tensor on `device` standing for the integer argument `name`.
void check_counter_tensor(const char* op, const char* name, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong && t.dim() == 0, op, ": ", name,
                   " as a tensor must be a 0-dim int64 tensor, got ", t.scalar_type(), " of shape ",
                   t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the gradients are on ",
                    device, "; the kernels read it where they run");
}

// Memory [begin, end) of one non-empty gradient, for the overlap check.
struct ByteRange {
  uintptr_t begin;
  uintptr_t end;
  size_t index;
};

}  // namespace

void check_grad_modulate_args(const char* op, at::TensorList grads, const at::Tensor& coeffs,
                              c10::IntArrayRef modality_index, const NoiseCounterArgs& counter, double eps) {
  TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kFloat, op, ": coeffs must be float32, got ",
                   coeffs.scalar_type());
  TORCH_CHECK_VALUE(coeffs.dim() == 1 && coeffs.numel() > 0, op,
                    ": coeffs must be a non-empty 1-D tensor (one coefficient per modality), got shape ",
                    coeffs.sizes());
  TORCH_CHECK_VALUE(coeffs.is_contiguous(), op, ": coeffs must be contiguous");
  TORCH_CHECK_VALUE(modality_index.size() == grads.size(), op, ": modality_index has ",
                    modality_index.size(), " entries but grads has ", grads.size(),
                    " tensors (one modality per gradient)");
  if (counter.seed_tensor.has_value()) {
    check_counter_tensor(op, "seed", *counter.seed_tensor, coeffs.device());
  }
  if (counter.step_tensor.has_value()) {
    check_counter_tensor(op, "step", *counter.step_tensor, coeffs.device());
    // A CPU counter is read here for free; a CUDA one only by the kernels (reading it here would
    // synchronise), which take its 64 bits as they are.
    if (counter.step_tensor->device().is_cpu()) {
      const int64_t step = *counter.step_tensor->const_data_ptr<int64_t>();
      TORCH_CHECK_VALUE(step >= 0, op, ": step must be >= 0, got ", step);
    }
  } else {
    TORCH_CHECK_VALUE(counter.step >= 0, op, ": step must be >= 0, got ", counter.step);
    TORCH_CHECK_VALUE(!counter.increment_step, op,
                      ": increment_step=True needs step as a 0-dim int64 tensor (a Python int cannot be "
                      "incremented in place)");
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(grads.size() < (size_t(1) << 31), op, ": too many gradient tensors");
  const int64_t num_modalities = coeffs.numel();
  std::vector<ByteRange> ranges;
  ranges.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), op, ": grads[", i, "] is undefined (None)");
    const auto dtype = g.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": grads[", i, "] has dtype ", dtype, "; expected float32, float16 or bfloat16");
    TORCH_CHECK_VALUE(g.device() == coeffs.device(), op, ": grads[", i, "] is on ", g.device(),
                      " but coeffs is on ", coeffs.device(),
                      "; coeffs must live on the gradients' device");
    // A copy would be modulated instead of the gradient, so there is no advice to make one.
    TORCH_CHECK_VALUE(g.numel() == 0 || g.is_non_overlapping_and_dense(), op, ": grads[", i, "] (shape ",
                      g.sizes(), ", strides ", g.strides(),
                      ") does not cover one dense block of memory (a strided slice or an expanded view); "
                      "pass the gradient tensors themselves, contiguous in any memory format "
                      "(e.g. channels_last)");
    TORCH_CHECK_VALUE(g.numel() <= kMaxNoiseElems, op, ": grads[", i, "] has ", g.numel(),
                      " elements; at most ", kMaxNoiseElems, " are supported");
    const int64_t m = modality_index[i];
    TORCH_CHECK_VALUE(m >= 0 && m < num_modalities, op, ": modality_index[", i, "] = ", m,
                      " is out of range [0, ", num_modalities, ")");
    if (g.numel() > 0) {
      // Dense with non-negative strides: element 0 is the lowest address, numel elements follow.
      const auto begin = reinterpret_cast<uintptr_t>(g.data_ptr());
      ranges.push_back(ByteRange{begin, begin + static_cast<uintptr_t>(g.numel() * g.element_size()), i});
    }
  }
  // Overlapping memory would be modulated twice (and race with itself on CUDA). Views of one
  // buffer (DDP buckets, flattened optimizer buffers) are fine as long as they are disjoint.
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  for (size_t j = 1, reach = 0; j < ranges.size(); ++j) {
    if (ranges[j - 1].end > ranges[reach].end) reach = j - 1;
    TORCH_CHECK_VALUE(ranges[j].begin >= ranges[reach].end, op, ": grads[", std::min(ranges[reach].index, ranges[j].index),
                      "] and grads[", std::max(ranges[reach].index, ranges[j].index),
                      "] overlap in memory; each element may be modulated once, so pass disjoint tensors");
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
