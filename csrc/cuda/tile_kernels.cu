// CUDA kernels for the tiles of the linear path (csrc/linear.cpp computes each tile's raw logits with cuBLAS):
// fold_tile merges a [n, width] fp32 tile into per-token online statistics, a warp per token; grad_tile overwrites a
// tile with dL/dx = transform'(x) * (g (onehot - p) + g_kl (p - q)), optionally measuring the tile's largest
// |p - onehot| (and |p - q|) for the gradient filter. No torch headers.
#include "device_utils.cuh"
#include "launchers.h"

#include <algorithm>
#include <cstring>

namespace dpo_kernels {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 4;
constexpr int kGradThreads = 256;

template <bool WITH_REF>
__global__ void fold_tile_kernel(const float* __restrict__ x, const float* __restrict__ xr, int64_t n, int64_t width,
                                 int64_t v0, const int64_t* __restrict__ labels, float* stats, int64_t ss,
                                 float* ref_stats, int64_t rss, TransformParams t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;
  const float* xrow = x + row * width;
  const float* rrow = WITH_REF ? xr + row * width : nullptr;
  Lse state{-INFINITY, 0.f};
  KlState ref{{-INFINITY, 0.f}, 0.f};
  for (int64_t i = lane; i < width; i += kWarp) {
    const float z = t.apply<float>(xrow[i]);
    state = lse_merge(state, Lse{z, 1.f});
    if constexpr (WITH_REF) {
      const float zr = t.apply<float>(rrow[i]);
      const float m = fmaxf(ref.ref.m, zr);
      const float f = __expf(ref.ref.m - m), e = __expf(zr - m);
      ref.ref.s = ref.ref.s * f + e;
      ref.w = ref.w * f + (e > 0.f ? e * (zr - z) : 0.f);
      ref.ref.m = m;
    }
  }
  state = warp_reduce(state);
  if constexpr (WITH_REF) ref = warp_reduce(ref);
  if (lane != 0) return;
  const Lse merged = lse_merge(Lse{stats[row], stats[ss + row]}, state);
  stats[row] = merged.m;
  stats[ss + row] = merged.s;
  const int64_t col = labels[row] - v0;
  const bool hit = col >= 0 && col < width;
  if (hit) stats[2 * ss + row] = t.apply<float>(xrow[col]);
  if constexpr (WITH_REF) {
    const KlState old{{ref_stats[row], ref_stats[rss + row]}, ref_stats[3 * rss + row]};
    const KlState r = kl_merge(old, ref);
    ref_stats[row] = r.ref.m;
    ref_stats[rss + row] = r.ref.s;
    ref_stats[3 * rss + row] = r.w;
    if (hit) ref_stats[2 * rss + row] = t.apply<float>(rrow[col]);
  }
}

template <bool WITH_KL, bool FILTER>
__global__ void grad_tile_kernel(float* x, const float* __restrict__ xr, int64_t n, int64_t width, int64_t v0,
                                 const int64_t* __restrict__ labels, const float* __restrict__ lse,
                                 const float* __restrict__ ref_lse, const float* __restrict__ g_in,
                                 const float* __restrict__ g_kl_in, TransformParams t, unsigned int* deviation) {
  float worst = 0.f;
  const int64_t total = n * width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / width, col = idx % width;
    const float raw = x[idx];
    const float p = __expf(t.apply<float>(raw) - lse[row]);
    const float onehot = (labels[row] - v0 == col) ? 1.f : 0.f;
    const float g = g_in[row];
    float dz = g * (onehot - p);
    if constexpr (FILTER) worst = fmaxf(worst, fabsf(p - onehot));
    if constexpr (WITH_KL) {
      const float q = __expf(t.apply<float>(xr[idx]) - ref_lse[row]);
      dz += g_kl_in[row] * (p - q);
      if constexpr (FILTER) worst = fmaxf(worst, fabsf(p - q));
    }
    x[idx] = t.grad<float>(raw, dz);
  }
  if constexpr (FILTER) {
    worst = warp_max(worst);
    // non-negative floats order like their bit patterns
    if (threadIdx.x % kWarp == 0) atomicMax(deviation, __float_as_uint(worst));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace dpo_kernels

using dpo_kernels::TransformParams;

extern "C" int dpo_fold_tile(int dtype, const void* x, const void* xr, int64_t n, int64_t width, int64_t v0,
                             const int64_t* labels, void* stats, int64_t stats_stride, void* ref_stats,
                             int64_t ref_stats_stride, double logit_scale, double softcap, double inv_temperature,
                             intptr_t stream) {
  using namespace dpo_kernels::cuda;
  if (dtype != DPO_FLOAT32) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const TransformParams t{logit_scale, softcap, inv_temperature};
  const unsigned blocks = static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* xf = static_cast<const float*>(x);
  const auto* xrf = static_cast<const float*>(xr);
  auto* st = static_cast<float*>(stats);
  auto* rst = static_cast<float*>(ref_stats);
  if (xr != nullptr) {
    fold_tile_kernel<true><<<blocks, kRowsPerBlock * kWarp, 0, s>>>(xf, xrf, n, width, v0, labels, st, stats_stride,
                                                                   rst, ref_stats_stride, t);
  } else {
    fold_tile_kernel<false><<<blocks, kRowsPerBlock * kWarp, 0, s>>>(xf, xrf, n, width, v0, labels, st, stats_stride,
                                                                    rst, ref_stats_stride, t);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int dpo_grad_tile(int dtype, void* x, const void* xr, int64_t n, int64_t width, int64_t v0,
                             const int64_t* labels, const void* lse, const void* ref_lse, const void* g,
                             const void* g_kl, double filter_eps, double logit_scale, double softcap,
                             double inv_temperature, int* kept, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  if (dtype != DPO_FLOAT32) return static_cast<int>(cudaErrorInvalidValue);
  *kept = 1;
  if (n == 0 || width == 0) return 0;
  const TransformParams t{logit_scale, softcap, inv_temperature};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t total = n * width;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kGradThreads - 1) / kGradThreads, 65535));
  const bool filter = filter_eps >= 0, with_kl = g_kl != nullptr;
  unsigned int* deviation = nullptr;
  if (filter) {
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&deviation), sizeof(unsigned int), s);
    if (err != cudaSuccess) return static_cast<int>(err);
    cudaMemsetAsync(deviation, 0, sizeof(unsigned int), s);
  }
  auto* xf = static_cast<float*>(x);
  const auto* xrf = static_cast<const float*>(xr);
  const auto *lf = static_cast<const float*>(lse), *rlf = static_cast<const float*>(ref_lse);
  const auto *gf = static_cast<const float*>(g), *gkf = static_cast<const float*>(g_kl);
#define DPO_GRAD(KL, FILT) \
  grad_tile_kernel<KL, FILT><<<blocks, kGradThreads, 0, s>>>(xf, xrf, n, width, v0, labels, lf, rlf, gf, gkf, t, deviation)
  if (with_kl) {
    if (filter) DPO_GRAD(true, true); else DPO_GRAD(true, false);
  } else {
    if (filter) DPO_GRAD(false, true); else DPO_GRAD(false, false);
  }
#undef DPO_GRAD
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  if (filter) {
    unsigned int bits = 0;
    cudaMemcpyAsync(&bits, deviation, sizeof(bits), cudaMemcpyDeviceToHost, s);
    cudaFreeAsync(deviation, s);
    err = cudaStreamSynchronize(s);
    if (err != cudaSuccess) return static_cast<int>(err);
    float worst;
    memcpy(&worst, &bits, sizeof(worst));
    *kept = worst >= static_cast<float>(filter_eps) ? 1 : 0;
  }
  return 0;
}
