// CPU implementation of mmfast::grad_modulate_ and of the raw noise stream (for tests).
// Gradients are dense (any memory format): chunks walk their memory in order.
// Parallel over chunks with at::parallel_for (torch's own OpenMP runtime); every chunk is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "../grad_modulate.h"
#include "../philox.h"
#include "vector_math.h"

namespace mmfast {
namespace cpu {
namespace {

// float64 sums of (x - shift) and (x - shift)^2 over one chunk. The shift (the tensor's first
// element) keeps the one-pass variance accurate when |mean| >> std.
template <typename T>
void chunk_moments(const T* __restrict g, int64_t begin, int64_t end, double shift, double* out) {
  double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s, ss)
  for (int64_t i = begin; i < end; ++i) {
    const double d = static_cast<double>(static_cast<float>(g[i])) - shift;
    s += d;
    ss += d * d;
  }
  out[0] = s;
  out[1] = ss;
}

template <typename T>
void scale_chunk(T* __restrict g, int64_t begin, int64_t end, float k) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) g[i] = static_cast<T>(k * static_cast<float>(g[i]));
}

// g <- k * g + sd * z, z the tensor's standard-normal stream; computed in float32, rounded once.
template <typename T>
void modulate_chunk(T* __restrict g, int64_t begin, int64_t end, float k, float sd,
                    const NoiseStream& stream, const VectorMath& vm) {
  alignas(64) float z[kNoiseBlockElems];
  for (int64_t b0 = begin; b0 < end; b0 += kNoiseBlockElems) {
    vm.gaussian_block(stream, static_cast<uint32_t>(b0 / kNoiseBlockElems), z);
    T* __restrict p = g + b0;
    const int64_t n = std::min<int64_t>(kNoiseBlockElems, end - b0);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(k * static_cast<float>(p[i]) + sd * z[i]);
  }
}

#define MMFAST_DISPATCH_GRAD_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void modulate_cpu(at::TensorList grads, const at::Tensor& coeffs, c10::IntArrayRef modality_index, bool noise,
                  uint64_t seed, uint64_t step, double eps) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = plan_chunks(grads, &first_chunk);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const float* k = coeffs.data_ptr<float>();

  if (!noise) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const at::Tensor& g = grads[chunks[c].tensor];
        const float kc = k[modality_index[chunks[c].tensor]];
        MMFAST_DISPATCH_GRAD_TYPES(g.scalar_type(), "grad_modulate_cpu_scale", [&] {
          scale_chunk(g.data_ptr<scalar_t>(), chunks[c].begin, chunks[c].end, kc);
        });
      }
    });
    return;
  }

  // Pass 1: per-chunk moments of the unscaled gradients.
  std::vector<double> shift(grads.size(), 0.0);
  for (size_t t = 0; t < grads.size(); ++t) {
    if (grads[t].numel() > 0) {
      MMFAST_DISPATCH_GRAD_TYPES(grads[t].scalar_type(), "grad_modulate_cpu_shift", [&] {
        shift[t] = static_cast<float>(grads[t].data_ptr<scalar_t>()[0]);
      });
    }
  }
  std::vector<double> partial(2 * chunks.size());
  at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const at::Tensor& g = grads[chunks[c].tensor];
      MMFAST_DISPATCH_GRAD_TYPES(g.scalar_type(), "grad_modulate_cpu_moments", [&] {
        chunk_moments(g.data_ptr<scalar_t>(), chunks[c].begin, chunks[c].end, shift[chunks[c].tensor],
                      &partial[2 * c]);
      });
    }
  });
  // Per-tensor std, combining chunk partials in chunk order (deterministic).
  std::vector<float> sd(grads.size(), 0.0f);
  for (size_t t = 0; t < grads.size(); ++t) {
    double s = 0.0, ss = 0.0;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
      s += partial[2 * c];
      ss += partial[2 * c + 1];
    }
    sd[t] = std_plus_eps(s, ss, grads[t].numel(), eps);
  }
  // Pass 2: scale and add noise.
  const VectorMath& vm = vector_math();
  at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t t = chunks[c].tensor;
      const at::Tensor& g = grads[t];
      const NoiseStream stream{seed, step, static_cast<uint32_t>(t)};
      MMFAST_DISPATCH_GRAD_TYPES(g.scalar_type(), "grad_modulate_cpu_noise", [&] {
        modulate_chunk(g.data_ptr<scalar_t>(), chunks[c].begin, chunks[c].end, k[modality_index[t]],
                       sd[t], stream, vm);
      });
    }
  });
}

void grad_modulate_cpu(at::TensorList grads, const at::Tensor& coeffs, c10::IntArrayRef modality_index,
                       bool noise, int64_t seed, int64_t step, double eps,
                       const c10::optional<at::Tensor>& seed_tensor, const c10::optional<at::Tensor>& step_tensor,
                       bool increment_step) {
  check_grad_modulate_args("grad_modulate_", grads, coeffs, modality_index,
                           NoiseCounterArgs{seed_tensor, step_tensor, seed, step, increment_step}, eps);
  // Counter tensors live in host memory here: reading them costs nothing.
  const int64_t seed_value = seed_tensor.has_value() ? *seed_tensor->const_data_ptr<int64_t>() : seed;
  const int64_t step_value = step_tensor.has_value() ? *step_tensor->const_data_ptr<int64_t>() : step;
  modulate_cpu(grads, coeffs, modality_index, noise, static_cast<uint64_t>(seed_value),
               static_cast<uint64_t>(step_value), eps);
  if (increment_step) ++*step_tensor->data_ptr<int64_t>();
}

// Fills float32 `out` with the standard-normal stream of (seed, step, position), for tests.
void gaussian_noise_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t position) {
  check_gaussian_noise_args(out, step, position);
  const NoiseStream stream{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                           static_cast<uint32_t>(position)};
  const VectorMath& vm = vector_math();
  float* p = out.data_ptr<float>();
  const int64_t n = out.numel();
  const int64_t num_blocks = (n + kNoiseBlockElems - 1) / kNoiseBlockElems;
  at::parallel_for(0, num_blocks, 16, [&](int64_t lo, int64_t hi) {
    alignas(64) float z[kNoiseBlockElems];
    for (int64_t b = lo; b < hi; ++b) {
      vm.gaussian_block(stream, static_cast<uint32_t>(b), z);
      const int64_t m = std::min<int64_t>(kNoiseBlockElems, n - b * kNoiseBlockElems);
      std::copy(z, z + m, p + b * kNoiseBlockElems);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("grad_modulate_", &grad_modulate_cpu);
  m.impl("gaussian_noise_", &gaussian_noise_cpu);
}

}  // namespace cpu
}  // namespace mmfast
