// The logit post-processing of MATH.md section 1, shared by the CPU and CUDA kernels (no torch headers):
// z = logit_scale * x, then softcap * tanh(z / softcap) when softcap > 0, then z * inv_temperature.
#pragma once

#if defined(__CUDACC__)
#define DPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPO_HOST_DEVICE inline
#endif

#include <cmath>
#include <cstdint>

namespace dpo_kernels {

// The math of a transform on one value type V: a scalar (acc_t, on the host or the device) by default; the CPU
// kernels specialise it for at::vec::Vectorized (row_kernels.h), so that one definition below serves every kernel.
template <typename V>
struct TransformMath {
  using scalar = V;
  static DPO_HOST_DEVICE V tanh(V x) { return ::tanh(x); }
};

// Held in double so that fp64 inputs keep full precision; fp32 kernels convert once per use.
struct TransformParams {
  double logit_scale;      // 1 when unused
  double softcap;          // <= 0 when unused
  double inv_temperature;  // 1 when unused

  DPO_HOST_DEVICE bool has_softcap() const { return softcap > 0.0; }
  DPO_HOST_DEVICE bool is_identity() const { return logit_scale == 1.0 && !has_softcap() && inv_temperature == 1.0; }

  // z from raw logit x (V: a scalar or a vector of them).
  template <typename V>
  DPO_HOST_DEVICE V apply(V x) const {
    using S = typename TransformMath<V>::scalar;
    V z = x * V(static_cast<S>(logit_scale));
    if (has_softcap()) z = V(static_cast<S>(softcap)) * TransformMath<V>::tanh(z / V(static_cast<S>(softcap)));
    return z * V(static_cast<S>(inv_temperature));
  }

  // z = apply(x) and slope = dz/dx with one tanh, for kernels that need both (dL/dx = dL/dz * slope).
  template <typename V>
  DPO_HOST_DEVICE V apply_and_slope(V x, V& slope) const {
    using S = typename TransformMath<V>::scalar;
    V z = x * V(static_cast<S>(logit_scale));
    slope = V(static_cast<S>(logit_scale) * static_cast<S>(inv_temperature));
    if (has_softcap()) {
      const V th = TransformMath<V>::tanh(z / V(static_cast<S>(softcap)));
      z = V(static_cast<S>(softcap)) * th;
      slope = slope * (V(S(1)) - th * th);
    }
    return z * V(static_cast<S>(inv_temperature));
  }

  // dz/dx from the transformed logit z itself (a scaled store's label column): logit_scale / temperature, times
  // 1 - tanh^2 with a softcap, where tanh = z temperature / softcap (dpo_kernels/ops/transform.py's slope_at).
  template <typename V>
  DPO_HOST_DEVICE V slope_at(V z) const {
    using S = typename TransformMath<V>::scalar;
    V slope = V(static_cast<S>(logit_scale) * static_cast<S>(inv_temperature));
    if (has_softcap()) {
      const V th = z / V(static_cast<S>(softcap) * static_cast<S>(inv_temperature));
      slope = slope * (V(S(1)) - th * th);
    }
    return slope;
  }

  // dL/dx from dL/dz at raw logit x: d/dx [c tanh(s x / c)] = s (1 - tanh^2), then the temperature.
  template <typename V>
  DPO_HOST_DEVICE V grad(V x, V grad_z) const {
    using S = typename TransformMath<V>::scalar;
    V factor = V(static_cast<S>(logit_scale) * static_cast<S>(inv_temperature));
    if (has_softcap()) {
      V t = TransformMath<V>::tanh(x * V(static_cast<S>(logit_scale)) / V(static_cast<S>(softcap)));
      factor = factor * (V(S(1)) - t * t);
    }
    return grad_z * factor;
  }
};

// log-sum-exp from a running max m and sum s of exp(z - m), with one rule for non-finite logits on every backend
// (MATH.md section 1): a row holding NaN or +inf has no softmax, so its lse is NaN and every statistic derived from
// it is NaN (never a plausible finite number, and never -inf, which would let a pair drop out of the loss).
template <typename acc_t>
DPO_HOST_DEVICE acc_t finish_lse(acc_t m, acc_t s) {
  if (m != m || m == static_cast<acc_t>(INFINITY)) return static_cast<acc_t>(NAN);
  return m + log(s);
}

// Whether a label (not ignore_index) is a column of a vocab-wide row. With check_labels=False an out-of-range label
// is a caller's error: the kernels then read nothing out of bounds and return NaN for that token.
DPO_HOST_DEVICE bool label_in_vocab(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

}  // namespace dpo_kernels
