// Vectorised building blocks of the CPU kernels: one logits row is processed in chunks that fit in L1, each chunk
// converted to the accumulation type (fp32, or fp64 for fp64 inputs) and transformed in a thread-local buffer.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../transform.h"

namespace dpo_kernels {
namespace cpu {

using at::vec::Vectorized;

}  // namespace cpu

// TransformParams' math on a vector of acc_t: one definition of the transform for the scalar and vector paths.
template <typename acc_t>
struct TransformMath<at::vec::Vectorized<acc_t>> {
  using scalar = acc_t;
  static at::vec::Vectorized<acc_t> tanh(const at::vec::Vectorized<acc_t>& x) { return x.tanh(); }
};

namespace cpu {

constexpr int64_t kChunk = 2048;  // elements of one row processed at a time (8 KiB of fp32)

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();  // inline polynomial, 2 ulp
  } else {
    return v.exp();
  }
}

// Converts `len` strided elements of a row to acc_t.
template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* row, int64_t stride, int64_t len, acc_t* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(row[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(row[i * stride]);
  }
}

// z = transform(x) for a chunk (TransformParams::apply, vectorised), out may alias x.
template <typename acc_t>
inline void transform_chunk(const TransformParams& t, const acc_t* x, acc_t* out, int64_t len) {
  using Vec = Vectorized<acc_t>;
  if (t.is_identity()) {
    if (out != x) std::copy(x, x + len, out);
    return;
  }
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) t.apply(Vec::loadu(x + i)).store(out + i);
  for (; i < len; ++i) out[i] = t.apply(x[i]);
}

template <typename acc_t>
inline acc_t chunk_max(const acc_t* z, int64_t len) {
  using Vec = Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, z, len);
}

// The shift of an online log-sum-exp step: the running max m, or 0 while it is -inf (every logit so far a
// probability 0), where exp(-inf - -inf) would be NaN; the sums are then 0 and stay so.
template <typename acc_t>
inline acc_t shift_of(acc_t m) {
  return m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m;
}

// Online log-sum-exp state of one row: running max m and sum s of exp(z - m).
template <typename acc_t>
struct OnlineLse {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;

  // Folds a chunk; returns exp(m_old - m_new), the factor applied to earlier sums.
  acc_t fold(const acc_t* z, int64_t len) {
    using Vec = Vectorized<acc_t>;
    const acc_t m_new = std::max(m, chunk_max(z, len));
    const acc_t shift = shift_of(m_new);
    const acc_t rescale = std::exp(m - shift);
    const Vec vm(shift);
    const acc_t sum = at::vec::map_reduce_all<acc_t>(
        [vm](Vec x) { return vexp(x - vm); }, [](Vec a, Vec b) { return a + b; }, z, len);
    s = s * rescale + sum;
    m = m_new;
    return rescale;
  }

  acc_t lse() const { return finish_lse(m, s); }
};

// Reference statistics for KL(ref || policy): the reference's online lse plus
// w = sum_v exp(zr_v - m_r) (zr_v - z_v), where an underflowed exp contributes exactly 0.
template <typename acc_t>
struct OnlineKl {
  OnlineLse<acc_t> ref;
  acc_t w = 0;

  void fold(const acc_t* z, const acc_t* zr, int64_t len) {
    using Vec = Vectorized<acc_t>;
    const acc_t rescale = ref.fold(zr, len);
    const Vec vm(shift_of(ref.m)), zero(0);
    const acc_t sum = at::vec::map2_reduce_all<acc_t>(
        [vm, zero](Vec pz, Vec rz) {
          Vec e = vexp(rz - vm);
          return Vec::blendv(zero, e * (rz - pz), e > zero);
        },
        [](Vec a, Vec b) { return a + b; }, z, zr, len);
    w = w * rescale + sum;
  }

  // KL = w / s_r - lse_r + lse (MATH.md section 1).
  acc_t kl(acc_t policy_lse) const { return w / ref.s - ref.lse() + policy_lse; }
};

// dL/dz = g (onehot - p) + g_kl (p - q) for a chunk, written into dz; label_col < 0 when the label is elsewhere.
template <typename acc_t>
inline void chunk_grad(const acc_t* z, const acc_t* zr, int64_t len, acc_t lse, acc_t ref_lse, acc_t g, acc_t g_kl,
                       bool with_kl, int64_t label_col, acc_t* dz) {
  using Vec = Vectorized<acc_t>;
  const Vec vlse(lse), vref_lse(ref_lse), vg(g), vgk(g_kl);
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    Vec p = vexp(Vec::loadu(z + i) - vlse);
    Vec d = Vec(0) - vg * p;
    if (with_kl) d = d + vgk * (p - vexp(Vec::loadu(zr + i) - vref_lse));
    d.store(dz + i);
  }
  for (; i < len; ++i) {
    acc_t p = std::exp(z[i] - lse);
    acc_t d = -g * p;
    if (with_kl) d += g_kl * (p - std::exp(zr[i] - ref_lse));
    dz[i] = d;
  }
  if (label_col >= 0) dz[label_col] += g;
}

// max |p - onehot| (and |p - q| with a KL) over a chunk: the gradient filter's criterion (opt-in, so scalar).
template <typename acc_t>
inline acc_t chunk_deviation(const acc_t* z, const acc_t* zr, int64_t len, acc_t lse, acc_t ref_lse, bool with_kl,
                             int64_t label_col) {
  acc_t dev = 0;
  for (int64_t i = 0; i < len; ++i) {
    acc_t p = std::exp(z[i] - lse);
    dev = std::max(dev, std::abs(p - (i == label_col ? acc_t(1) : acc_t(0))));
    if (with_kl) dev = std::max(dev, std::abs(p - std::exp(zr[i] - ref_lse)));
  }
  return dev;
}

// dL/dx from dL/dz for a chunk of raw logits x (TransformParams::grad, vectorised); out may alias dz.
template <typename acc_t>
inline void transform_grad_chunk(const TransformParams& t, const acc_t* x, const acc_t* dz, acc_t* out, int64_t len) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) t.grad(Vec::loadu(x + i), Vec::loadu(dz + i)).store(out + i);
  for (; i < len; ++i) out[i] = t.grad(x[i], dz[i]);
}

}  // namespace cpu
}  // namespace dpo_kernels
