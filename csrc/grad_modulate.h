// Host-side pieces of the fused OGM-GE gradient modulation op shared by its CPU and CUDA kernels:
// argument checks (clear Python ValueError/TypeError) and the chunk plan both backends walk.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace mmfast {

// One work unit: elements [begin, end) of grads[tensor], in memory order. begin is a multiple of
// kChunkElems, so every chunk starts on a noise-block boundary.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The noise stream's key and counter. Either host integers (`seed`, `step`) or 0-dim int64
// tensors on the gradients' device (`seed_tensor`, `step_tensor`), which the kernels read where
// they run: then one compiled graph or one captured CUDA graph serves every step.
struct NoiseCounterArgs {
  const c10::optional<at::Tensor>& seed_tensor;
  const c10::optional<at::Tensor>& step_tensor;
  int64_t seed;
  int64_t step;
  bool increment_step;
};

// Raises ValueError/TypeError naming the offending argument. `op` names the caller in messages.
// Gradients may be any dense, non-overlapping tensors (contiguous in some memory format, e.g.
// channels_last): the op is elementwise plus a per-tensor std, so it walks their memory in order.
void check_grad_modulate_args(const char* op, at::TensorList grads, const at::Tensor& coeffs,
                              c10::IntArrayRef modality_index, const NoiseCounterArgs& counter, double eps);

// Checks of gaussian_noise_(out, seed, step, position).
void check_gaussian_noise_args(const at::Tensor& out, int64_t step, int64_t position);

// Chunks of every non-empty tensor, in list order; first_chunk has size grads.size() + 1.
std::vector<Chunk> plan_chunks(at::TensorList grads, std::vector<int64_t>* first_chunk);

}  // namespace mmfast
