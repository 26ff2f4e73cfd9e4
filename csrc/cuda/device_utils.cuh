// Device helpers shared by the CUDA kernels: online log-sum-exp states and their warp / block merges, dtype
// conversion and 16-byte vector loads. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../transform.h"
#include "launchers.h"

namespace dpo_kernels {
namespace cuda {

constexpr int kWarp = 32;

// Calls f with a value of the element type of a dtype code (float, __half or __nv_bfloat16); returns f's result, or
// cudaErrorInvalidValue for another code.
template <typename F>
int with_element_type(int dtype, F&& f) {
  switch (dtype) {
    case DPO_FLOAT32:
      return f(float{});
    case DPO_FLOAT16:
      return f(__half{});
    case DPO_BFLOAT16:
      return f(__nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements of T loaded or stored as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packet {
  T v[VEC];
};

// Online log-sum-exp of a set of values: running max m and sum s of exp(z - m).
struct Lse {
  float m;
  float s;
};

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};  // 0, or NaN carried from a NaN logit
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// The reference side of KL(ref || policy): its own Lse plus w = sum exp(zr - m_r) (zr - z).
struct KlState {
  Lse ref;
  float w;
};

__device__ __forceinline__ KlState kl_merge(KlState a, KlState b) {
  const float m = fmaxf(a.ref.m, b.ref.m);
  if (m == -INFINITY) return {{m, a.ref.s + b.ref.s}, a.w + b.w};  // 0, or NaN carried from a NaN logit
  const float fa = __expf(a.ref.m - m), fb = __expf(b.ref.m - m);
  return {{m, a.ref.s * fa + b.ref.s * fb}, a.w * fa + b.w * fb};
}

// Folds one policy logit z into the thread's running log-sum-exp state: one exp per logit. A -inf logit is a
// probability 0 and adds nothing (against a running max still at -inf, exp(-inf - -inf) would be NaN); a NaN adds
// NaN (MATH.md's rule for non-finite logits).
__device__ __forceinline__ void fold_policy(float z, Lse& state) {
  if (z > state.m) {
    state.s = state.s * __expf(state.m - z) + 1.f;
    state.m = z;
  } else if (z != -INFINITY) {
    state.s += __expf(z - state.m);
  }
}

// Folds one reference logit zr (beside the policy's z) into the reference's state and the KL's weighted sum.
__device__ __forceinline__ void fold_reference(float z, float zr, KlState& ref) {
  if (zr > ref.ref.m) {
    const float f = __expf(ref.ref.m - zr);
    ref.ref.s = ref.ref.s * f + 1.f;
    ref.w = ref.w * f + (zr - z);
    ref.ref.m = zr;
  } else if (zr != -INFINITY) {  // a -inf reference logit adds nothing, as in fold_policy
    const float e = __expf(zr - ref.ref.m);
    ref.ref.s += e;
    if (e > 0.f) ref.w += e * (zr - z);  // an underflowed reference probability contributes exactly 0
  }
}

// Folds one policy logit z (and reference logit zr) into the thread's running states.
template <bool WITH_REF>
__device__ __forceinline__ void fold_logit(float z, float zr, Lse& state, KlState& ref) {
  fold_policy(z, state);
  if constexpr (WITH_REF) fold_reference(z, zr, ref);
}

__device__ __forceinline__ Lse warp_reduce(Lse x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Lse other{__shfl_xor_sync(0xffffffffu, x.m, offset), __shfl_xor_sync(0xffffffffu, x.s, offset)};
    x = lse_merge(x, other);
  }
  return x;
}

__device__ __forceinline__ KlState warp_reduce(KlState x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    KlState other{{__shfl_xor_sync(0xffffffffu, x.ref.m, offset), __shfl_xor_sync(0xffffffffu, x.ref.s, offset)},
                  __shfl_xor_sync(0xffffffffu, x.w, offset)};
    x = kl_merge(x, other);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ Lse lse_or_kl_merge(Lse a, Lse b) { return lse_merge(a, b); }
__device__ __forceinline__ KlState lse_or_kl_merge(KlState a, KlState b) { return kl_merge(a, b); }

// Reduces a per-thread state over the THREADS threads of one row (a warp, or the whole block); every thread of
// the row gets the result. `scratch` holds one state per warp.
template <int THREADS, typename State>
__device__ __forceinline__ State row_reduce(State x, State* scratch) {
  x = warp_reduce(x);
  if constexpr (THREADS > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = scratch[0];
#pragma unroll
    for (int w = 1; w < THREADS / kWarp; ++w) x = lse_or_kl_merge(x, scratch[w]);
    __syncthreads();
  }
  return x;
}

}  // namespace cuda
}  // namespace dpo_kernels
