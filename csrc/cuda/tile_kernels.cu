// CUDA kernels for the tiles of the linear path. The tile loop (dpo_kernels/ops/linear/loop.py) writes each tile's
// raw fp32 logits with one cuBLAS GEMM (half operands on the tensor cores, fp32 output), then:
//
// - fold_tile merges a [n, width] tile into per-token online statistics: a warp per token, each lane reading
//   16-byte packets (4 floats) when the rows allow it, one exp per logit (and one per reference logit), a warp
//   shuffle merge, then lane 0 merges into the running [3, n] / [4, n] statistics (and, on request, the [4, n]
//   rows trainers only log, with no further exp). Memory bound: it reads the tile once (4 bytes per logit, 8 with
//   a reference) and writes O(n).
// - grad_tile writes dL/dx = transform'(x) * (g (onehot - p) + g_kl (p - q)) into out [n, width] in the GEMM operand
//   dtype (bf16 / fp16 / fp32; out may be x itself for fp32): a 2-D grid of (token, column block), 4 columns per
//   thread, the token's scalars read once per thread. Memory bound: reads 4 bytes per logit (8 with the KL) and writes
//   2 (bf16). Optionally measures the tile's largest |p - onehot| (and |p - q|) for the gradient filter.
// - fold_weights / fold_shifted: after fold_tile, a second launch writing the tile's softmax weights e^{z - c} t'(x)
//   (a frozen head's GEMM operands, the eager schedule's fp16 store) at each row's new max (fold_weights) or at its
//   lazily moved shift (fold_shifted: a block a row, which also rescales the row's sums where the shift moved).
// - scaled_grad writes dZ from a tile kept as fp16 softmax weights (the scaled store): grad_tile's grid, 2 bytes
//   read per logit (4 with the reference's weights).
//
// What that traffic costs next to the GEMMs is the design target computed in dpo_kernels/ops/linear/loop.py's
// docstring (from peak rates, not measured).
// No torch headers.
#include "../stats_layout.h"
#include "device_utils.cuh"
#include "launchers.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

namespace dpo_kernels {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 4;
constexpr int kGradThreads = 256;
constexpr int kVec = 4;  // floats per 16-byte packet

template <int VEC>
__device__ __forceinline__ Packet<float, VEC> load_packet(const float* p, int64_t i) {
  return *reinterpret_cast<const Packet<float, VEC>*>(p + i);
}

template <int VEC>
__device__ __forceinline__ Packet<float, VEC> load_bias(const float* bias, int64_t i) {
  if (bias == nullptr) {
    Packet<float, VEC> zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = 0.f;
    return zero;
  }
  return load_packet<VEC>(bias, i);
}

__device__ __forceinline__ float biased(const float* x, const float* bias, int64_t i) {
  return x[i] + (bias == nullptr ? 0.f : bias[i]);
}

// The statistics trainers only log, beside a policy Lse state (m, s): xs = sum e^{z - m} z, sq = sum e^{2 (z - m)},
// zs = sum z, and `before`, the largest z left of the label's column.
struct Logged {
  float xs, sq, zs, before;
};

// fold_policy plus the logged sums, one exp per logit.
__device__ __forceinline__ void fold_logged(float z, bool left_of_label, Lse& state, Logged& lg) {
  if (z > state.m) {
    const float f = __expf(state.m - z);
    state.s = state.s * f + 1.f;
    lg.xs = lg.xs * f + z;
    lg.sq = lg.sq * f * f + 1.f;
    state.m = z;
  } else if (z != -INFINITY) {  // a -inf logit adds nothing to the sums (fold_policy)
    const float e = __expf(z - state.m);
    state.s += e;
    lg.xs += e * z;
    lg.sq += e * e;
  }
  lg.zs += z;
  if (left_of_label) lg.before = fmaxf(lg.before, z);
}

// Merges (b, lb) into (a, la); a state that saw nothing (m = -inf) contributes nothing.
__device__ __forceinline__ void merge_logged(Lse& a, Logged& la, Lse b, Logged lb) {
  const float m = fmaxf(a.m, b.m);
  const float fa = a.m == -INFINITY ? 0.f : __expf(a.m - m), fb = b.m == -INFINITY ? 0.f : __expf(b.m - m);
  a = Lse{m, a.s * fa + b.s * fb};
  la = Logged{la.xs * fa + lb.xs * fb, la.sq * fa * fa + lb.sq * fb * fb, la.zs + lb.zs, fmaxf(la.before, lb.before)};
}

__device__ __forceinline__ void warp_reduce_logged(Lse& state, Logged& lg) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Lse other{__shfl_xor_sync(0xffffffffu, state.m, offset), __shfl_xor_sync(0xffffffffu, state.s, offset)};
    const Logged lo{__shfl_xor_sync(0xffffffffu, lg.xs, offset), __shfl_xor_sync(0xffffffffu, lg.sq, offset),
                    __shfl_xor_sync(0xffffffffu, lg.zs, offset), __shfl_xor_sync(0xffffffffu, lg.before, offset)};
    merge_logged(state, lg, other, lo);
  }
}

// stats rows (stride ss): max, sum, label logit, then with LOGGING the Logged sums xs, sq, zs, before.
template <bool WITH_REF, bool LOGGING, int VEC>
__global__ void fold_tile_kernel(const float* __restrict__ x, const float* __restrict__ bias,
                                 const float* __restrict__ xr, const float* __restrict__ ref_bias, int64_t n,
                                 int64_t width, int64_t v0, const int64_t* __restrict__ labels, float* stats,
                                 int64_t ss, float* ref_stats, int64_t rss, TransformParams t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;  // whole warps only
  const float* xrow = x + row * width;
  const float* rrow = WITH_REF ? xr + row * width : nullptr;
  const int64_t col = labels[row] - v0;
  Lse state{-INFINITY, 0.f};
  KlState ref{{-INFINITY, 0.f}, 0.f};
  Logged lg{0.f, 0.f, 0.f, -INFINITY};
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < width; i += kWarp * VEC) {
    const Packet<float, VEC> px = load_packet<VEC>(xrow, i), pb = load_bias<VEC>(bias, i);
    Packet<float, VEC> pr, prb;
    if constexpr (WITH_REF) {
      pr = load_packet<VEC>(rrow, i);
      prb = load_bias<VEC>(ref_bias, i);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float z = t.apply<float>(px.v[k] + pb.v[k]);
      if constexpr (LOGGING) {
        fold_logged(z, i + k < col, state, lg);
      } else {
        fold_policy(z, state);
      }
      if constexpr (WITH_REF) fold_reference(z, t.apply<float>(pr.v[k] + prb.v[k]), ref);
    }
  }
  if constexpr (LOGGING) {
    warp_reduce_logged(state, lg);
  } else {
    state = warp_reduce(state);
  }
  if constexpr (WITH_REF) ref = warp_reduce(ref);
  if (lane != 0) return;
  float* st = stats + row;  // row r of this token's statistics at st[r * ss] (stats_layout.h)
  Lse merged{st[kMax * ss], st[kSum * ss]};
  if constexpr (LOGGING) {
    Logged old{st[kWeightedLogits * ss], st[kSquares * ss], st[kLogitSum * ss], st[kMaxBeforeLabel * ss]};
    merge_logged(merged, old, state, lg);
    st[kWeightedLogits * ss] = old.xs;
    st[kSquares * ss] = old.sq;
    st[kLogitSum * ss] = old.zs;
    st[kMaxBeforeLabel * ss] = old.before;
  } else {
    merged = lse_merge(merged, state);
  }
  st[kMax * ss] = merged.m;
  st[kSum * ss] = merged.s;
  const bool hit = col >= 0 && col < width;
  if (hit) st[kLabelLogit * ss] = t.apply<float>(biased(xrow, bias, col));
  if constexpr (WITH_REF) {
    float* rst = ref_stats + row;
    const KlState r = kl_merge(KlState{{rst[kRefMax * rss], rst[kRefSum * rss]}, rst[kRefWeighted * rss]}, ref);
    rst[kRefMax * rss] = r.ref.m;
    rst[kRefSum * rss] = r.ref.s;
    rst[kRefWeighted * rss] = r.w;
    if (hit) rst[kRefLabelLogit * rss] = t.apply<float>(biased(rrow, ref_bias, col));
  }
}

// x and out may be the same memory (an fp32 tile turned into its gradient in place): no __restrict__ on them.
template <typename OUT, bool WITH_KL, int VEC>
__global__ void grad_tile_kernel(const float* x, const float* __restrict__ bias, const float* __restrict__ xr,
                                 const float* __restrict__ ref_bias, OUT* out, int64_t width, int64_t v0,
                                 const int64_t* __restrict__ labels, const float* __restrict__ lse,
                                 const float* __restrict__ ref_lse, const float* __restrict__ g_in,
                                 const float* __restrict__ g_kl_in, TransformParams t, unsigned int* deviation) {
  const int64_t row = blockIdx.x;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  float worst = 0.f;
  if (col0 < width) {
    const int64_t offset = row * width + col0;
    const int64_t label_col = labels[row] - v0;
    const float row_lse = lse[row], g = g_in[row];
    const float row_ref_lse = WITH_KL ? ref_lse[row] : 0.f, g_kl = WITH_KL ? g_kl_in[row] : 0.f;
    const Packet<float, VEC> px = load_packet<VEC>(x, offset), pb = load_bias<VEC>(bias, col0);
    Packet<float, VEC> pr, prb;
    if constexpr (WITH_KL) {
      pr = load_packet<VEC>(xr, offset);
      prb = load_bias<VEC>(ref_bias, col0);
    }
    Packet<OUT, VEC> po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float slope;  // dz/dx, from the same tanh as z
      const float p = __expf(t.apply_and_slope<float>(px.v[k] + pb.v[k], slope) - row_lse);
      const float onehot = (col0 + k == label_col) ? 1.f : 0.f;
      float dz = g * (onehot - p);
      worst = fmaxf(worst, fabsf(p - onehot));
      if constexpr (WITH_KL) {
        const float q = __expf(t.apply<float>(pr.v[k] + prb.v[k]) - row_ref_lse);
        dz += g_kl * (p - q);
        worst = fmaxf(worst, fabsf(p - q));
      }
      po.v[k] = from_float<OUT>(dz * slope);
    }
    *reinterpret_cast<Packet<OUT, VEC>*>(out + offset) = po;
  }
  if (deviation != nullptr) {
    worst = warp_max(worst);
    // non-negative floats order like their bit patterns
    if (threadIdx.x % kWarp == 0) atomicMax(deviation, __float_as_uint(worst));
  }
}

// VEC entries of a tile row from column col0 (offset = row * width + col0) as softmax weights: w = e^{z - at} t'(x),
// and with a reference e^{zr - ref_at} t'(x) (the policy's slope), in W. x and w may be the same memory (fp32
// weights over their tile): each entry is read before it is written, by the thread that writes it.
template <typename W, bool WITH_REF, int VEC>
__device__ __forceinline__ void write_weights(const float* x, const float* bias, const float* xr, const float* ref_bias,
                                              W* w, W* ref_w, int64_t offset, int64_t col0, float at, float ref_at,
                                              const TransformParams& t) {
  const Packet<float, VEC> px = load_packet<VEC>(x, offset), pb = load_bias<VEC>(bias, col0);
  Packet<float, VEC> pr, prb;
  if constexpr (WITH_REF) {
    pr = load_packet<VEC>(xr, offset);
    prb = load_bias<VEC>(ref_bias, col0);
  }
  Packet<W, VEC> pw, prw;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float slope;  // dz/dx, from the same tanh as z
    const float z = t.apply_and_slope<float>(px.v[k] + pb.v[k], slope);
    pw.v[k] = from_float<W>(__expf(z - at) * slope);
    if constexpr (WITH_REF) prw.v[k] = from_float<W>(__expf(t.apply<float>(pr.v[k] + prb.v[k]) - ref_at) * slope);
  }
  *reinterpret_cast<Packet<W, VEC>*>(w + offset) = pw;
  if constexpr (WITH_REF) *reinterpret_cast<Packet<W, VEC>*>(ref_w + offset) = prw;
}

// fold_weights' second pass, after fold_tile_kernel has written the row's new maxima into stats (and ref_stats):
// w = e^{z - m'} t'(x) of each entry of the tile, and with a reference e^{zr - mr'} t'(x) (the policy's slope), in
// W (the GEMM operand dtype). A maximum still -inf shifts by 0. x and w may be the same memory (write_weights): no
// __restrict__ on them.
template <typename W, bool WITH_REF, int VEC>
__global__ void fold_weights_kernel(const float* x, const float* __restrict__ bias, const float* xr,
                                    const float* __restrict__ ref_bias, W* w, W* ref_w, int64_t width,
                                    const float* __restrict__ stats, int64_t ss, const float* __restrict__ ref_stats,
                                    int64_t rss, TransformParams t) {
  const int64_t row = blockIdx.x;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col0 >= width) return;
  const float m = stats[kMax * ss + row];
  float ref_at = 0.f;
  if constexpr (WITH_REF) {
    const float mr = ref_stats[kRefMax * rss + row];
    ref_at = mr == -INFINITY ? 0.f : mr;
  }
  write_weights<W, WITH_REF, VEC>(x, bias, xr, ref_bias, w, ref_w, row * width + col0, col0,
                                  m == -INFINITY ? 0.f : m, ref_at, t);
}

// fold_shifted's shift rule (dpo_kernels/ops/linear/contract.py): a row's shift s stays unless its max after the
// tile m' exceeds s + headroom, then it moves to m' (a max still -inf, or the lowest float, never moves it).
__device__ __forceinline__ float moved_shift(float s, float m, float headroom) {
  return (m > s + headroom && m > -FLT_MAX) ? m : s;
}

// A row of sums [dim] brought from shift s to s' by the block's threads: scaled by e^{s - s'} where the shift moved
// from a finite s (a row at -inf holds 0).
__device__ __forceinline__ void move_sums(float* sums, float s, float moved, int64_t dim) {
  if (moved == s || s == -INFINITY) return;
  const float factor = __expf(s - moved);
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) sums[k] *= factor;
}

// fold_shifted's second pass, after fold_tile_kernel has written the row's new maxima into stats (and ref_stats):
// one block a row takes the row's shift from `shift` (moved by the rule above), writes w = e^{z - s'} t'(x) (and
// e^{zr - s_r'} t'(x) with the policy's slope), rescales the row of the sums `acc` [n, dim] (row stride
// acc_stride) by e^{s - s'} where the shift moved from a finite s (SUMS), and stores s' in shift_out (which may be
// `shift`: every thread reads the old value before it is written). x and w may be the same memory (write_weights).
template <typename W, bool WITH_REF, bool SUMS, int VEC>
__global__ void fold_shifted_kernel(const float* x, const float* __restrict__ bias, const float* xr,
                                    const float* __restrict__ ref_bias, W* w, W* ref_w, int64_t width,
                                    const float* __restrict__ stats, int64_t ss, const float* __restrict__ ref_stats,
                                    int64_t rss, float* __restrict__ acc, const float* shift,
                                    float* __restrict__ ref_acc, const float* ref_shift, float* shift_out,
                                    float* ref_shift_out, int64_t acc_stride, int64_t dim, float headroom,
                                    TransformParams t) {
  const int64_t row = blockIdx.x;
  const float old = shift[row], now = moved_shift(old, stats[kMax * ss + row], headroom);
  const float at = now == -INFINITY ? 0.f : now;  // a shift still -inf: every logit so far -inf, weights 0
  float ref_old = 0.f, ref_now = 0.f, ref_at = 0.f;
  if constexpr (WITH_REF) {
    ref_old = ref_shift[row];
    ref_now = moved_shift(ref_old, ref_stats[kRefMax * rss + row], headroom);
    ref_at = ref_now == -INFINITY ? 0.f : ref_now;
  }
  for (int64_t col0 = static_cast<int64_t>(threadIdx.x) * VEC; col0 < width; col0 += int64_t{blockDim.x} * VEC) {
    write_weights<W, WITH_REF, VEC>(x, bias, xr, ref_bias, w, ref_w, row * width + col0, col0, at, ref_at, t);
  }
  if constexpr (SUMS) {
    move_sums(acc + row * acc_stride, old, now, dim);
    if constexpr (WITH_REF) move_sums(ref_acc + row * acc_stride, ref_old, ref_now, dim);
  }
  __syncthreads();  // every thread has read the shifts
  if (threadIdx.x == 0) {
    shift_out[row] = now;
    if constexpr (WITH_REF) ref_shift_out[row] = ref_now;
  }
}

// dZ of a tile kept as its fp16 softmax weights a (the eager schedule's scaled store; contract.py's scaled_grad):
// out = -(g - g_kl) e^{m - lse} a - g_kl e^{m_r - lse_r} a_r, and at the label's column the exact
// t'(z_y) (g (1 - p_y) + g_kl (p_y - q_y)) from the label logits; a (token, column block) grid as grad_tile's, out
// rows at any stride.
template <typename OUT, bool WITH_REF, int VEC>
__global__ void scaled_grad_kernel(const __half* __restrict__ a, const __half* __restrict__ ar,
                                   const float* __restrict__ maxes, const float* __restrict__ ref_maxes,
                                   const float* __restrict__ label_logits, const float* __restrict__ ref_label_logits,
                                   const int64_t* __restrict__ labels, const float* __restrict__ lse,
                                   const float* __restrict__ ref_lse, const float* __restrict__ g_in,
                                   const float* __restrict__ g_kl_in, OUT* __restrict__ out, int64_t out_stride,
                                   int64_t width, int64_t v0, TransformParams t) {
  const int64_t row = blockIdx.x;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col0 >= width) return;
  const float row_lse = lse[row], g = g_in[row], g_kl = WITH_REF ? g_kl_in[row] : 0.f;
  const float m = maxes[row];
  const float scale = -(g - g_kl) * __expf((m == -INFINITY ? 0.f : m) - row_lse);
  float ref_scale = 0.f;
  if constexpr (WITH_REF) {
    const float mr = ref_maxes[row];
    ref_scale = -g_kl * __expf((mr == -INFINITY ? 0.f : mr) - ref_lse[row]);
  }
  const Packet<__half, VEC> pa = *reinterpret_cast<const Packet<__half, VEC>*>(a + row * width + col0);
  Packet<__half, VEC> pr;
  if constexpr (WITH_REF) pr = *reinterpret_cast<const Packet<__half, VEC>*>(ar + row * width + col0);
  const int64_t label_col = labels[row] - v0;
  Packet<OUT, VEC> po;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float dz = scale * to_float(pa.v[k]);
    if constexpr (WITH_REF) dz += ref_scale * to_float(pr.v[k]);
    if (col0 + k == label_col) {
      const float z_y = label_logits[row], p_y = __expf(z_y - row_lse);
      float value = g * (1.f - p_y);
      if constexpr (WITH_REF) value += g_kl * (p_y - __expf(ref_label_logits[row] - ref_lse[row]));
      dz = value * t.slope_at<float>(z_y);
    }
    po.v[k] = from_float<OUT>(dz);
  }
  *reinterpret_cast<Packet<OUT, VEC>*>(out + row * out_stride + col0) = po;
}

bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Whether write_weights may move kVec entries at a time: whole packets across the width, and every tile, bias and
// weights pointer (the reference's too, with its weights) aligned to a packet.
bool weights_vectorized(int weights_dtype, int64_t width, const float* x, const float* bias, const float* xr,
                        const float* ref_bias, const void* weights, const void* ref_weights) {
  const int w_bytes = weights_dtype == DPO_FLOAT32 ? 4 : 2;
  return width % kVec == 0 && aligned(x, 16) && aligned(bias, 16) && aligned(weights, kVec * w_bytes) &&
         (ref_weights == nullptr ||
          (aligned(xr, 16) && aligned(ref_bias, 16) && aligned(ref_weights, kVec * w_bytes)));
}

template <typename OUT, bool WITH_KL>
void launch_grad(bool vec, dim3 grid_vec, dim3 grid_scalar, cudaStream_t s, const float* x, const float* bias,
                 const float* xr, const float* ref_bias, void* out, int64_t width, int64_t v0, const int64_t* labels,
                 const float* lse, const float* ref_lse, const float* g, const float* g_kl, TransformParams t,
                 unsigned int* deviation) {
  auto* o = static_cast<OUT*>(out);
  if (vec) {
    grad_tile_kernel<OUT, WITH_KL, kVec><<<grid_vec, kGradThreads, 0, s>>>(x, bias, xr, ref_bias, o, width, v0,
                                                                           labels, lse, ref_lse, g, g_kl, t, deviation);
  } else {
    grad_tile_kernel<OUT, WITH_KL, 1><<<grid_scalar, kGradThreads, 0, s>>>(x, bias, xr, ref_bias, o, width, v0,
                                                                          labels, lse, ref_lse, g, g_kl, t, deviation);
  }
}

template <typename W, bool WITH_REF>
void launch_weights(bool vec, dim3 grid_vec, dim3 grid_scalar, cudaStream_t s, const float* x, const float* bias,
                    const float* xr, const float* ref_bias, void* w, void* ref_w, int64_t width, const float* stats,
                    int64_t ss, const float* ref_stats, int64_t rss, TransformParams t) {
  auto *o = static_cast<W*>(w), *ro = static_cast<W*>(ref_w);
  if (vec) {
    fold_weights_kernel<W, WITH_REF, kVec><<<grid_vec, kGradThreads, 0, s>>>(x, bias, xr, ref_bias, o, ro, width,
                                                                             stats, ss, ref_stats, rss, t);
  } else {
    fold_weights_kernel<W, WITH_REF, 1><<<grid_scalar, kGradThreads, 0, s>>>(x, bias, xr, ref_bias, o, ro, width,
                                                                            stats, ss, ref_stats, rss, t);
  }
}

template <typename W, bool WITH_REF, bool SUMS>
void launch_shifted(bool vec, unsigned rows, cudaStream_t s, const float* x, const float* bias, const float* xr,
                    const float* ref_bias, void* w, void* ref_w, int64_t width, const float* stats, int64_t ss,
                    const float* ref_stats, int64_t rss, float* acc, const float* shift, float* ref_acc,
                    const float* ref_shift, float* shift_out, float* ref_shift_out, int64_t acc_stride, int64_t dim,
                    float headroom, TransformParams t) {
  auto *o = static_cast<W*>(w), *ro = static_cast<W*>(ref_w);
  if (vec) {
    fold_shifted_kernel<W, WITH_REF, SUMS, kVec><<<rows, kGradThreads, 0, s>>>(
        x, bias, xr, ref_bias, o, ro, width, stats, ss, ref_stats, rss, acc, shift, ref_acc, ref_shift, shift_out,
        ref_shift_out, acc_stride, dim, headroom, t);
  } else {
    fold_shifted_kernel<W, WITH_REF, SUMS, 1><<<rows, kGradThreads, 0, s>>>(
        x, bias, xr, ref_bias, o, ro, width, stats, ss, ref_stats, rss, acc, shift, ref_acc, ref_shift, shift_out,
        ref_shift_out, acc_stride, dim, headroom, t);
  }
}

template <typename OUT, bool WITH_REF>
void launch_scaled_grad(bool vec, dim3 grid_vec, dim3 grid_scalar, cudaStream_t s, const __half* a, const __half* ar,
                        const float* maxes, const float* ref_maxes, const float* label_logits,
                        const float* ref_label_logits, const int64_t* labels, const float* lse, const float* ref_lse,
                        const float* g, const float* g_kl, void* out, int64_t out_stride, int64_t width, int64_t v0,
                        TransformParams t) {
  auto* o = static_cast<OUT*>(out);
  if (vec) {
    scaled_grad_kernel<OUT, WITH_REF, kVec><<<grid_vec, kGradThreads, 0, s>>>(
        a, ar, maxes, ref_maxes, label_logits, ref_label_logits, labels, lse, ref_lse, g, g_kl, o, out_stride, width, v0,
        t);
  } else {
    scaled_grad_kernel<OUT, WITH_REF, 1><<<grid_scalar, kGradThreads, 0, s>>>(
        a, ar, maxes, ref_maxes, label_logits, ref_label_logits, labels, lse, ref_lse, g, g_kl, o, out_stride, width, v0,
        t);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace dpo_kernels

using dpo_kernels::TransformParams;

extern "C" int dpo_fold_tile(DpoTile tile, DpoTile ref, float* stats, int64_t stats_stride, int logging,
                             float* ref_stats, int64_t ref_stats_stride, DpoTransform transform, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const float *x = tile.x, *bias = tile.bias, *xr = ref.x, *ref_bias = ref.bias;
  const int64_t n = tile.n, width = tile.width, v0 = tile.v0;
  const int64_t* labels = tile.labels;
  if (n == 0 || width == 0) return 0;
  const TransformParams t{transform.logit_scale, transform.softcap, transform.inv_temperature};
  const unsigned blocks = static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = width % kVec == 0 && aligned(x, 16) && aligned(xr, 16) && aligned(bias, 16) &&
                   aligned(ref_bias, 16);
#define DPO_FOLD(REF, LOG, VEC)                                                                                     \
  fold_tile_kernel<REF, LOG, VEC><<<blocks, kRowsPerBlock * kWarp, 0, s>>>(x, bias, xr, ref_bias, n, width, v0,   \
                                                                           labels, stats, stats_stride, ref_stats,  \
                                                                           ref_stats_stride, t)
  const bool with_ref = xr != nullptr;
  if (with_ref && logging) {
    if (vec) DPO_FOLD(true, true, kVec); else DPO_FOLD(true, true, 1);
  } else if (with_ref) {
    if (vec) DPO_FOLD(true, false, kVec); else DPO_FOLD(true, false, 1);
  } else if (logging) {
    if (vec) DPO_FOLD(false, true, kVec); else DPO_FOLD(false, true, 1);
  } else {
    if (vec) DPO_FOLD(false, false, kVec); else DPO_FOLD(false, false, 1);
  }
#undef DPO_FOLD
  return static_cast<int>(cudaGetLastError());
}

extern "C" int dpo_grad_tile(int out_dtype, DpoTile tile, DpoTile ref, const float* lse, const float* g,
                             const float* ref_lse, const float* g_kl, void* out, double filter_eps,
                             DpoTransform transform, int* kept, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const float *x = tile.x, *bias = tile.bias, *xr = ref.x, *ref_bias = ref.bias;
  const int64_t n = tile.n, width = tile.width, v0 = tile.v0;
  const int64_t* labels = tile.labels;
  *kept = 1;
  if (n == 0 || width == 0) return 0;
  if (n > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  const TransformParams t{transform.logit_scale, transform.softcap, transform.inv_temperature};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int out_bytes = out_dtype == DPO_FLOAT32 ? 4 : 2;
  const bool vec = width % kVec == 0 && aligned(x, 16) && aligned(xr, 16) && aligned(bias, 16) &&
                   aligned(ref_bias, 16) && aligned(out, kVec * out_bytes);
  const dim3 grid_vec(static_cast<unsigned>(n),
                      static_cast<unsigned>((width + kGradThreads * kVec - 1) / (kGradThreads * kVec)));
  const dim3 grid_scalar(static_cast<unsigned>(n), static_cast<unsigned>((width + kGradThreads - 1) / kGradThreads));
  unsigned int* deviation = nullptr;
  if (filter_eps >= 0) {
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&deviation), sizeof(unsigned int), s);
    if (err != cudaSuccess) return static_cast<int>(err);
    cudaMemsetAsync(deviation, 0, sizeof(unsigned int), s);
  }
  const int bad_dtype = with_element_type(out_dtype, [&](auto out_type) {
    using OUT = decltype(out_type);
    if (g_kl != nullptr) {
      launch_grad<OUT, true>(vec, grid_vec, grid_scalar, s, x, bias, xr, ref_bias, out, width, v0, labels, lse, ref_lse,
                             g, g_kl, t, deviation);
    } else {
      launch_grad<OUT, false>(vec, grid_vec, grid_scalar, s, x, bias, xr, ref_bias, out, width, v0, labels, lse,
                              ref_lse, g, g_kl, t, deviation);
    }
    return 0;
  });
  if (bad_dtype != 0) {
    if (deviation != nullptr) cudaFreeAsync(deviation, s);
    return bad_dtype;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  if (deviation != nullptr) {
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

extern "C" int dpo_fold_weights(int weights_dtype, DpoTile tile, DpoTile ref, const float* stats, int64_t stats_stride,
                                const float* ref_stats, int64_t ref_stats_stride, void* weights, void* ref_weights,
                                DpoTransform transform, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const float *x = tile.x, *bias = tile.bias, *xr = ref.x, *ref_bias = ref.bias;
  const int64_t n = tile.n, width = tile.width;
  if (n == 0 || width == 0) return 0;
  if (n > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  const TransformParams t{transform.logit_scale, transform.softcap, transform.inv_temperature};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool with_ref = ref_weights != nullptr;
  const bool vec = weights_vectorized(weights_dtype, width, x, bias, xr, ref_bias, weights, ref_weights);
  const dim3 grid_vec(static_cast<unsigned>(n),
                      static_cast<unsigned>((width + kGradThreads * kVec - 1) / (kGradThreads * kVec)));
  const dim3 grid_scalar(static_cast<unsigned>(n), static_cast<unsigned>((width + kGradThreads - 1) / kGradThreads));
  const int bad_dtype = with_element_type(weights_dtype, [&](auto weights_type) {
    using W = decltype(weights_type);
    if (with_ref) {
      launch_weights<W, true>(vec, grid_vec, grid_scalar, s, x, bias, xr, ref_bias, weights, ref_weights, width, stats,
                              stats_stride, ref_stats, ref_stats_stride, t);
    } else {
      launch_weights<W, false>(vec, grid_vec, grid_scalar, s, x, bias, xr, ref_bias, weights, ref_weights, width,
                               stats, stats_stride, ref_stats, ref_stats_stride, t);
    }
    return 0;
  });
  if (bad_dtype != 0) return bad_dtype;
  return static_cast<int>(cudaGetLastError());
}

extern "C" int dpo_fold_shifted(int weights_dtype, DpoTile tile, DpoTile ref, const float* stats, int64_t stats_stride,
                                const float* ref_stats, int64_t ref_stats_stride, void* weights, void* ref_weights,
                                float* acc, const float* shift, float* ref_acc, const float* ref_shift,
                                float* shift_out, float* ref_shift_out, int64_t acc_stride, int64_t dim,
                                double headroom, DpoTransform transform, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const float *x = tile.x, *bias = tile.bias, *xr = ref.x, *ref_bias = ref.bias;
  const int64_t n = tile.n, width = tile.width;
  if (n == 0 || width == 0) return 0;
  if (n > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  const TransformParams t{transform.logit_scale, transform.softcap, transform.inv_temperature};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool with_ref = ref_weights != nullptr, sums = acc != nullptr;
  if (shift_out == nullptr ||
      (with_ref && ((ref_acc != nullptr) != sums || ref_shift == nullptr || ref_shift_out == nullptr))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool vec = weights_vectorized(weights_dtype, width, x, bias, xr, ref_bias, weights, ref_weights);
  const auto rows = static_cast<unsigned>(n);
  const float room = static_cast<float>(headroom);
  return with_element_type(weights_dtype, [&](auto weights_type) {
    using W = decltype(weights_type);
#define DPO_SHIFTED(REF, SUMS)                                                                                      \
  launch_shifted<W, REF, SUMS>(vec, rows, s, x, bias, xr, ref_bias, weights, ref_weights, width, stats, stats_stride, \
                               ref_stats, ref_stats_stride, acc, shift, ref_acc, ref_shift, shift_out, ref_shift_out, \
                               acc_stride, dim, room, t)
    if (with_ref && sums) {
      DPO_SHIFTED(true, true);
    } else if (with_ref) {
      DPO_SHIFTED(true, false);
    } else if (sums) {
      DPO_SHIFTED(false, true);
    } else {
      DPO_SHIFTED(false, false);
    }
#undef DPO_SHIFTED
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int dpo_scaled_grad(int out_dtype, const void* weights, const void* ref_weights, const float* maxes,
                               const float* ref_maxes, const float* label_logits, const float* ref_label_logits,
                               const int64_t* labels, int64_t n, int64_t width, int64_t v0, const float* lse,
                               const float* ref_lse, const float* g, const float* g_kl, void* out,
                               int64_t out_stride, DpoTransform transform, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  if (n == 0 || width == 0) return 0;
  if (n > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  const TransformParams t{transform.logit_scale, transform.softcap, transform.inv_temperature};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool with_ref = ref_weights != nullptr;
  const auto* a = static_cast<const __half*>(weights);
  const auto* ar = static_cast<const __half*>(ref_weights);
  const int out_bytes = out_dtype == DPO_FLOAT32 ? 4 : 2;
  const bool vec = width % kVec == 0 && out_stride % kVec == 0 && aligned(a, kVec * 2) && aligned(ar, kVec * 2) &&
                   aligned(out, kVec * out_bytes);
  const dim3 grid_vec(static_cast<unsigned>(n),
                      static_cast<unsigned>((width + kGradThreads * kVec - 1) / (kGradThreads * kVec)));
  const dim3 grid_scalar(static_cast<unsigned>(n), static_cast<unsigned>((width + kGradThreads - 1) / kGradThreads));
  return with_element_type(out_dtype, [&](auto out_type) {
    using OUT = decltype(out_type);
    if (with_ref) {
      launch_scaled_grad<OUT, true>(vec, grid_vec, grid_scalar, s, a, ar, maxes, ref_maxes, label_logits,
                                    ref_label_logits, labels, lse, ref_lse, g, g_kl, out, out_stride, width, v0, t);
    } else {
      launch_scaled_grad<OUT, false>(vec, grid_vec, grid_scalar, s, a, ar, maxes, ref_maxes, label_logits,
                                     ref_label_logits, labels, lse, ref_lse, g, g_kl, out, out_stride, width, v0, t);
    }
    return static_cast<int>(cudaGetLastError());
  });
}
