// Host-side pieces of the fused OGM-GE gradient modulation op shared by its CPU and CUDA kernels:
// argument checks (clear Python ValueError/TypeError) and the chunk plan both backends walk.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace mmfast {

// One work unit: elements [begin, end) of grads[tensor]. begin is a multiple of kChunkElems, so
// every chunk starts on a noise-block boundary.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Raises ValueError/TypeError naming the offending argument. `op` names the caller in messages.
void check_grad_modulate_args(const char* op, at::TensorList grads, const at::Tensor& coeffs,
                              c10::IntArrayRef modality_index, int64_t step, double eps);

// Checks of gaussian_noise_(out, seed, step, position).
void check_gaussian_noise_args(const at::Tensor& out, int64_t step, int64_t position);

// Chunks of every non-empty tensor, in list order; first_chunk has size grads.size() + 1.
std::vector<Chunk> plan_chunks(at::TensorList grads, std::vector<int64_t>* first_chunk);

}  // namespace mmfast
