// CUDA implementation of mmfast::grad_modulate_, multi-tensor-apply style: every gradient of
// every dtype is covered by one chunk table on the device, walked by three launches (moments,
// per-tensor std, modulation). Nothing here waits for the device: coeffs, and the noise seed and
// step when given as tensors, are read by the kernels, never by the host. Gradients are dense
// (any memory format): chunks walk their memory in order.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "../grad_modulate.h"
#include "../philox.h"

namespace mmfast {
namespace cuda {
namespace {

constexpr int kThreads = static_cast<int>(kCountersPerBlock);  // one Philox counter per thread
enum GradDtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Device view of the packed int64 metadata (see pack_metadata for the layout).
struct Plan {
  const int64_t* ptr;          // [T] data pointers
  const int64_t* numel;        // [T]
  const int64_t* dtype;        // [T] GradDtype
  const int64_t* modality;     // [T]
  const int64_t* first_chunk;  // [T + 1]
  const int64_t* chunk_tensor; // [C]
  const int64_t* chunk_begin;  // [C]
  const int64_t* chunk_end;    // [C]
};

Plan make_plan(const int64_t* base, int64_t T, int64_t C) {
  Plan p;
  p.ptr = base;
  p.numel = p.ptr + T;
  p.dtype = p.numel + T;
  p.modality = p.dtype + T;
  p.first_chunk = p.modality + T;
  p.chunk_tensor = p.first_chunk + T + 1;
  p.chunk_begin = p.chunk_tensor + C;
  p.chunk_end = p.chunk_begin + C;
  return p;
}

// The noise key and counter: host values, replaced by the tensors' values where given (read on
// the device, so a captured CUDA graph or a compiled step picks up each new step).
struct Counter {
  const int64_t* seed_ptr;  // nullable
  const int64_t* step_ptr;  // nullable
  uint64_t seed;
  uint64_t step;
};

__device__ __forceinline__ void read_counter(const Counter& c, uint64_t& seed, uint64_t& step) {
  seed = c.seed_ptr ? static_cast<uint64_t>(*c.seed_ptr) : c.seed;
  step = c.step_ptr ? static_cast<uint64_t>(*c.step_ptr) : c.step;
}

template <typename T>
__device__ __forceinline__ float load_f(const void* base, int64_t i) {
  return static_cast<float>(static_cast<const T*>(base)[i]);
}

__device__ __forceinline__ float load_any(int64_t dtype, const void* base, int64_t i) {
  switch (dtype) {
    case kF16: return load_f<c10::Half>(base, i);
    case kBF16: return load_f<c10::BFloat16>(base, i);
    default: return load_f<float>(base, i);
  }
}

__device__ __forceinline__ void store_any(int64_t dtype, void* base, int64_t i, float v) {
  switch (dtype) {
    case kF16: static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(v); break;
    case kBF16: static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// The four normals of one noise counter (lanes 0..3).
__device__ __forceinline__ void draw_normals4(PhiloxKey key, uint32_t counter, uint32_t position,
                                              uint64_t step, float z[4]) {
  uint32_t x0, x1, x2, x3;
  noise_words(key, counter, position, step, x0, x1, x2, x3);
  box_muller4(x0, x1, x2, x3, z[0], z[1], z[2], z[3]);
}

// Fixed-shape tree reduction: deterministic for a given launch configuration.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads], sb[kThreads];
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sa[threadIdx.x] += sa[threadIdx.x + w];
      sb[threadIdx.x] += sb[threadIdx.x + w];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

// Pass 1: float64 sums of (x - x[0]) and (x - x[0])^2 per chunk.
__global__ void chunk_moments_kernel(Plan plan, double* partial) {
  const int64_t c = blockIdx.x;
  const int64_t t = plan.chunk_tensor[c];
  const int64_t dtype = plan.dtype[t];
  const void* g = reinterpret_cast<const void*>(plan.ptr[t]);
  const double shift = load_any(dtype, g, 0);
  double s = 0.0, ss = 0.0;
  for (int64_t i = plan.chunk_begin[c] + threadIdx.x; i < plan.chunk_end[c]; i += kThreads) {
    const double d = static_cast<double>(load_any(dtype, g, i)) - shift;
    s += d;
    ss += d * d;
  }
  block_sum2(s, ss);
  if (threadIdx.x == 0) {
    partial[2 * c] = s;
    partial[2 * c + 1] = ss;
  }
}

// Pass 2: one warp per tensor combines its chunk partials (fixed order) into std + eps.
__global__ void tensor_std_kernel(Plan plan, const double* partial, float* sd, double eps) {
  const int64_t t = blockIdx.x;
  double s = 0.0, ss = 0.0;
  for (int64_t c = plan.first_chunk[t] + threadIdx.x; c < plan.first_chunk[t + 1]; c += 32) {
    s += partial[2 * c];
    ss += partial[2 * c + 1];
  }
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_down_sync(0xffffffffu, s, off);
    ss += __shfl_down_sync(0xffffffffu, ss, off);
  }
  if (threadIdx.x == 0) sd[t] = std_plus_eps(s, ss, plan.numel[t], eps);
}

// Pass 3: g <- k * g (+ sd * z). Thread j of noise block b draws counter b*256 + j and writes
// elements b*1024 + lane*256 + j: the layout of philox.h, coalesced.
__global__ void modulate_kernel(Plan plan, const float* coeffs, const float* sd, bool noise, Counter counter) {
  const int64_t c = blockIdx.x;
  const int64_t t = plan.chunk_tensor[c];
  const int64_t dtype = plan.dtype[t];
  void* g = reinterpret_cast<void*>(plan.ptr[t]);
  const int64_t begin = plan.chunk_begin[c], end = plan.chunk_end[c];
  const float k = coeffs[plan.modality[t]];
  if (!noise) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      store_any(dtype, g, i, k * load_any(dtype, g, i));
    }
    return;
  }
  const float sdt = sd[t];
  uint64_t seed, step;
  read_counter(counter, seed, step);
  const PhiloxKey key = philox_key(seed);
  for (int64_t b0 = begin; b0 < end; b0 += kNoiseBlockElems) {
    float z[4];
    draw_normals4(key, static_cast<uint32_t>(b0 / kNoiseBlockElems * kCountersPerBlock) + threadIdx.x,
                  static_cast<uint32_t>(t), step, z);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = b0 + lane * kCountersPerBlock + threadIdx.x;
      if (i < end) store_any(dtype, g, i, k * load_any(dtype, g, i) + sdt * z[lane]);
    }
  }
}

// One step after the modulation has read it (a separate launch: every block reads the step).
__global__ void increment_kernel(int64_t* step) { *step += 1; }

int64_t dtype_code(at::ScalarType s) {
  return s == at::kHalf ? kF16 : (s == at::kBFloat16 ? kBF16 : kF32);
}

// Device copies of chunk plans, reused while the same gradients come back (a trainer passes the
// same .grad tensors every step), so a step uploads no metadata. The cache compares the whole
// host-side plan, so a hit is always a plan equal to the one this call would upload. A plan used
// while a CUDA graph is being captured is kept for the life of the process: every replay of the
// graph reads it (and the graph's copy node reads its pinned host buffer).
class PlanCache {
 public:
  const int64_t* get(const std::vector<int64_t>& host, const c10::Device& device, const at::cuda::CUDAStream& stream) {
    const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
    std::lock_guard<std::mutex> lock(mutex_);
    ++clock_;
    for (Entry& e : entries_) {
      if (e.device == device && e.host == host) {
        e.last_use = clock_;
        e.keep |= capturing;
        if (!capturing && e.stream != stream) {
          // Read on another stream than it was made on: its memory must outlive that use too.
          c10::cuda::CUDACachingAllocator::recordStream(e.dev.storage().data_ptr(), stream);
        }
        return e.dev.const_data_ptr<int64_t>();
      }
    }
    Entry e{host, device, stream, {}, {}, clock_, capturing};
    {
      // Inside a capture (best avoided by one call before it, as CUDA graphs want anyway) the
      // pinned allocation is no stream work; relaxed mode permits it, as torch's allocator does.
      c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      e.pinned = at::empty({static_cast<int64_t>(host.size())},
                           at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    }
    std::copy(host.begin(), host.end(), e.pinned.data_ptr<int64_t>());
    e.dev = e.pinned.to(device, /*non_blocking=*/true);
    evict_for_one_more();
    entries_.push_back(std::move(e));
    return entries_.back().dev.const_data_ptr<int64_t>();
  }

 private:
  static constexpr size_t kCapacity = 16;  // plans not used in captures
  struct Entry {
    std::vector<int64_t> host;
    c10::Device device;
    at::cuda::CUDAStream stream;
    at::Tensor pinned;
    at::Tensor dev;
    uint64_t last_use;
    bool keep;  // used in a CUDA-graph capture
  };
  void evict_for_one_more() {
    const auto evictable = [](const Entry& e) { return !e.keep; };
    while (static_cast<size_t>(std::count_if(entries_.begin(), entries_.end(), evictable)) >= kCapacity) {
      auto oldest = entries_.end();
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (evictable(*it) && (oldest == entries_.end() || it->last_use < oldest->last_use)) oldest = it;
      }
      entries_.erase(oldest);
    }
  }
  std::mutex mutex_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // never destroyed: CUDA may be torn down first at exit
  return *cache;
}

void grad_modulate_cuda(at::TensorList grads, const at::Tensor& coeffs, c10::IntArrayRef modality_index,
                        bool noise, int64_t seed, int64_t step, double eps,
                        const c10::optional<at::Tensor>& seed_tensor, const c10::optional<at::Tensor>& step_tensor,
                        bool increment_step) {
  check_grad_modulate_args("grad_modulate_", grads, coeffs, modality_index,
                           NoiseCounterArgs{seed_tensor, step_tensor, seed, step, increment_step}, eps);
  const c10::cuda::CUDAGuard guard(coeffs.device());
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = plan_chunks(grads, &first_chunk);
  const int64_t T = static_cast<int64_t>(grads.size());
  const int64_t C = static_cast<int64_t>(chunks.size());
  if (C > 0) {
    // The plan's int64 metadata, in the layout make_plan reads.
    std::vector<int64_t> m(5 * T + 1 + 3 * C);
    for (int64_t t = 0; t < T; ++t) {
      m[t] = reinterpret_cast<int64_t>(grads[t].data_ptr());
      m[T + t] = grads[t].numel();
      m[2 * T + t] = dtype_code(grads[t].scalar_type());
      m[3 * T + t] = modality_index[t];
    }
    std::copy(first_chunk.begin(), first_chunk.end(), m.begin() + 4 * T);
    int64_t* ct = m.data() + 5 * T + 1;
    for (int64_t c = 0; c < C; ++c) {
      ct[c] = chunks[c].tensor;
      ct[C + c] = chunks[c].begin;
      ct[2 * C + c] = chunks[c].end;
    }
    const Plan plan = make_plan(plan_cache().get(m, coeffs.device(), stream), T, C);
    const Counter counter{seed_tensor.has_value() ? seed_tensor->const_data_ptr<int64_t>() : nullptr,
                          step_tensor.has_value() ? step_tensor->const_data_ptr<int64_t>() : nullptr,
                          static_cast<uint64_t>(seed), static_cast<uint64_t>(step)};
    at::Tensor sd;
    if (noise) {
      at::Tensor partial = at::empty({2 * C}, coeffs.options().dtype(at::kDouble));
      sd = at::empty({T}, coeffs.options());
      chunk_moments_kernel<<<C, kThreads, 0, stream>>>(plan, partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tensor_std_kernel<<<T, 32, 0, stream>>>(plan, partial.data_ptr<double>(), sd.data_ptr<float>(), eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    modulate_kernel<<<C, kThreads, 0, stream>>>(plan, coeffs.data_ptr<float>(),
                                                noise ? sd.data_ptr<float>() : nullptr, noise, counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (increment_step) {
    increment_kernel<<<1, 1, 0, stream>>>(step_tensor->data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

__global__ void gaussian_noise_kernel(float* out, int64_t n, uint64_t seed, uint64_t step, uint32_t position) {
  const int64_t b = blockIdx.x;
  float z[4];
  draw_normals4(philox_key(seed), static_cast<uint32_t>(b * kCountersPerBlock) + threadIdx.x, position,
                step, z);
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = b * kNoiseBlockElems + lane * kCountersPerBlock + threadIdx.x;
    if (i < n) out[i] = z[lane];
  }
}

void gaussian_noise_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t position) {
  check_gaussian_noise_args(out, step, position);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t blocks = (n + kNoiseBlockElems - 1) / kNoiseBlockElems;
  gaussian_noise_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
      static_cast<uint32_t>(position));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("grad_modulate_", &grad_modulate_cuda);
  m.impl("gaussian_noise_", &gaussian_noise_cuda);
}

}  // namespace cuda
}  // namespace mmfast
