// CUDA kernels from logits: per-token log-probs, and with reference logits the reference log-probs and
// KL(ref || policy), in one pass over each row (online log-sum-exp); the backward writes
// g (onehot - p) + g_kl (p - q) through the logit transform, in place when grad == logits.
//
// The reference's logits may have another dtype than the policy's (a bf16 reference model beside an fp32 policy).
// Mapping: a warp per row when V <= kWarpRowMaxVocab (several rows per block), else a block of kBlockThreads per
// row. Loads are VEC-wide 16-byte packets when the rows are contiguous and aligned, scalar otherwise. Statistics
// are fp32 for fp32 / fp16 / bf16 inputs. No __launch_bounds__: with it ptxas aimed below the register budget
// and spilled; blocks are at most 256 threads, so any register count up to 255 fits an SM. No torch headers.
#include "../stats_layout.h"
#include "device_utils.cuh"
#include "launchers.h"

#include <type_traits>

namespace dpo_kernels {
namespace cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpRowMaxVocab = 4096;
constexpr int kWarpRowsPerBlock = 4;

struct RowLayout {
  int64_t stride_r, stride_t, stride_v;
  __device__ __forceinline__ int64_t offset(int64_t row, int64_t seq_len) const {
    return (row / seq_len) * stride_r + (row % seq_len) * stride_t;
  }
};

// Where the fold kernel (RAW) writes a row's named statistics (stats_layout.h): stats rows max, sum, label logit
// and ref_stats rows max, sum, label logit, w, each row `stride` floats apart.
struct RawStats {
  float* stats;
  int64_t stride;
  float* ref_stats;
  int64_t ref_stride;
};

// RAW: the from-logits fold of a vocabulary slice, the row's statistics written to `raw` unfinished (a label outside
// [0, vocab) adds no label logit; a masked row writes nothing); else the finished outputs.
template <typename T, typename TR, int VEC, int THREADS, int ROWS_PER_BLOCK, bool WITH_REF, bool RAW>
__global__ void
    logits_forward_kernel(const T* __restrict__ logits, RowLayout layout, const TR* __restrict__ ref_logits,
                          RowLayout ref_layout, const int64_t* __restrict__ labels, int64_t rows, int64_t seq_len,
                          int64_t vocab, int64_t ignore_index, TransformParams t, float* __restrict__ logp,
                          float* __restrict__ lse_out, float* __restrict__ ref_logp, float* __restrict__ ref_lse_out,
                          float* __restrict__ kl_out, RawStats raw) {
  __shared__ KlState scratch[THREADS > kWarp ? THREADS / kWarp : 1];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  if (row >= rows) return;  // whole warps only: ROWS_PER_BLOCK > 1 implies THREADS == kWarp
  const int64_t label = labels[row];
  if (label == ignore_index) {  // a masked token reads nothing
    if (!RAW && lane == 0) {
      logp[row] = lse_out[row] = 0.f;
      if (WITH_REF) ref_logp[row] = ref_lse_out[row] = kl_out[row] = 0.f;
    }
    return;
  }
  const T* x_row = logits + layout.offset(row, seq_len);
  const TR* r_row = WITH_REF ? ref_logits + ref_layout.offset(row, seq_len) : nullptr;
  Lse state{-INFINITY, 0.f};
  KlState ref{{-INFINITY, 0.f}, 0.f};
  // one pass: each element of both rows is read once
  int64_t tail = 0;
  if constexpr (VEC > 1) {
    const int64_t packets = vocab / VEC;
    for (int64_t p = lane; p < packets; p += THREADS) {
      const Packet<T, VEC> px = reinterpret_cast<const Packet<T, VEC>*>(x_row)[p];
      Packet<TR, VEC> pr;
      if constexpr (WITH_REF) pr = reinterpret_cast<const Packet<TR, VEC>*>(r_row)[p];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float zr = WITH_REF ? t.apply<float>(to_float(pr.v[k])) : 0.f;
        fold_logit<WITH_REF>(t.apply<float>(to_float(px.v[k])), zr, state, ref);
      }
    }
    tail = packets * VEC;
  }
  for (int64_t i = tail + lane; i < vocab; i += THREADS) {
    const float zr = WITH_REF ? t.apply<float>(to_float(r_row[i * ref_layout.stride_v])) : 0.f;
    fold_logit<WITH_REF>(t.apply<float>(to_float(x_row[i * layout.stride_v])), zr, state, ref);
  }
  state = row_reduce<THREADS>(state, reinterpret_cast<Lse*>(scratch));
  const float lse = finish_lse(state.m, state.s);
  const bool in_vocab = label_in_vocab(label, vocab);  // else (check_labels=False) NaN, and no read out of bounds
  if constexpr (RAW) {
    if constexpr (WITH_REF) ref = row_reduce<THREADS>(ref, scratch);
    if (lane == 0) {
      raw.stats[kMax * raw.stride + row] = state.m;
      raw.stats[kSum * raw.stride + row] = state.s;
      if (in_vocab) {
        raw.stats[kLabelLogit * raw.stride + row] = t.apply<float>(to_float(x_row[label * layout.stride_v]));
      }
      if constexpr (WITH_REF) {
        raw.ref_stats[kRefMax * raw.ref_stride + row] = ref.ref.m;
        raw.ref_stats[kRefSum * raw.ref_stride + row] = ref.ref.s;
        raw.ref_stats[kRefWeighted * raw.ref_stride + row] = ref.w;
        if (in_vocab) {
          raw.ref_stats[kRefLabelLogit * raw.ref_stride + row] =
              t.apply<float>(to_float(r_row[label * ref_layout.stride_v]));
        }
      }
    }
    return;
  }
  if constexpr (WITH_REF) {
    ref = row_reduce<THREADS>(ref, scratch);
    if (lane == 0) {
      const float lse_r = finish_lse(ref.ref.m, ref.ref.s);
      ref_lse_out[row] = lse_r;
      ref_logp[row] = in_vocab ? t.apply<float>(to_float(r_row[label * ref_layout.stride_v])) - lse_r : NAN;
      kl_out[row] = ref.w / ref.ref.s - lse_r + lse;
    }
  }
  if (lane == 0) {
    lse_out[row] = lse;
    logp[row] = in_vocab ? t.apply<float>(to_float(x_row[label * layout.stride_v])) - lse : NAN;
  }
}

template <typename T, typename TR, int VEC, int THREADS, int ROWS_PER_BLOCK, bool WITH_KL>
__global__ void
    logits_backward_kernel(const T* logits, RowLayout layout, const TR* __restrict__ ref_logits, RowLayout ref_layout,
                           T* grad, RowLayout grad_layout, const int64_t* __restrict__ labels,
                           const float* __restrict__ lse, const float* __restrict__ ref_lse,
                           const float* __restrict__ g_in, const float* __restrict__ g_kl_in, int64_t rows,
                           int64_t seq_len, int64_t vocab, int64_t ignore_index, TransformParams t) {
  // logits and grad may alias (in-place backward): every element is read before the same thread writes it.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  if (row >= rows) return;
  const int64_t label = labels[row];
  const bool valid = label != ignore_index;
  const float g = valid ? g_in[row] : 0.f;
  const float row_lse = lse[row];
  const float g_kl = (WITH_KL && valid) ? g_kl_in[row] : 0.f;
  const float row_ref_lse = WITH_KL ? ref_lse[row] : 0.f;
  const T* x_row = logits + layout.offset(row, seq_len);
  const TR* r_row = WITH_KL ? ref_logits + ref_layout.offset(row, seq_len) : nullptr;
  T* g_row = grad + grad_layout.offset(row, seq_len);
  if (!valid) {  // a masked row: zeros, without reading its logits or the reference's
    for (int64_t i = lane; i < vocab; i += THREADS) g_row[i * grad_layout.stride_v] = from_float<T>(0.f);
    return;
  }
  // x: the policy's raw logit at column i; xr: the reference's (read only WITH_KL)
  auto grad_at = [&](int64_t i, float x, float xr) -> float {
    float slope;  // dz/dx, from the same tanh as z
    const float p = __expf(t.apply_and_slope<float>(x, slope) - row_lse);
    float dz = (i == label ? g : 0.f) - g * p;
    if constexpr (WITH_KL) dz += g_kl * (p - __expf(t.apply<float>(xr) - row_ref_lse));
    return dz * slope;
  };
  auto ref_at = [&](int64_t i) -> float { return WITH_KL ? to_float(r_row[i * ref_layout.stride_v]) : 0.f; };
  if constexpr (VEC > 1) {
    const int64_t packets = vocab / VEC;
    for (int64_t p = lane; p < packets; p += THREADS) {
      const Packet<T, VEC> in = reinterpret_cast<const Packet<T, VEC>*>(x_row)[p];
      Packet<TR, VEC> ref_in;  // the reference's packet, as wide as the policy's
      if constexpr (WITH_KL) ref_in = reinterpret_cast<const Packet<TR, VEC>*>(r_row)[p];
      Packet<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = from_float<T>(grad_at(p * VEC + k, to_float(in.v[k]), WITH_KL ? to_float(ref_in.v[k]) : 0.f));
      }
      reinterpret_cast<Packet<T, VEC>*>(g_row)[p] = out;
    }
    for (int64_t i = packets * VEC + lane; i < vocab; i += THREADS) {
      g_row[i] = from_float<T>(grad_at(i, to_float(x_row[i]), ref_at(i)));
    }
  } else {
    for (int64_t i = lane; i < vocab; i += THREADS) {
      g_row[i * grad_layout.stride_v] = from_float<T>(grad_at(i, to_float(x_row[i * layout.stride_v]), ref_at(i)));
    }
  }
}

// Whether rows of this layout can be read as 16-byte packets of VEC elements.
template <int VEC>
bool packets_ok(const void* base, RowLayout l, int elem_size) {
  return l.stride_v == 1 && l.stride_r % VEC == 0 && l.stride_t % VEC == 0 &&
         reinterpret_cast<uintptr_t>(base) % (VEC * elem_size) == 0;
}

// Packets of VEC elements of both rows: 16 bytes of the wider type.
template <typename T, typename TR>
constexpr int packet_elems() {
  return 16 / (sizeof(T) > sizeof(TR) ? sizeof(T) : sizeof(TR));
}

// The reference's logits may have another dtype than the policy's (TR); without a reference TR is unused and the
// kernels are instantiated with TR = T only.
template <bool RAW, typename T, typename TR>
int launch_forward_as(const T* x, RowLayout xl, const TR* r, RowLayout rl, const int64_t* labels, int64_t rows,
                      int64_t seq_len, int64_t vocab, int64_t ignore_index, TransformParams t, float* logp, float* lse,
                      float* ref_logp, float* ref_lse, float* kl, RawStats raw, cudaStream_t stream) {
  constexpr int VEC = packet_elems<T, TR>();
  const bool with_ref = r != nullptr;
  const bool vec = packets_ok<VEC>(x, xl, sizeof(T)) && (!with_ref || packets_ok<VEC>(r, rl, sizeof(TR)));
  if (rows == 0) return 0;  // a grid of 0 blocks is an invalid launch configuration
  auto go = [&](auto kernel, auto ref, int threads, int rows_per_block) {
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    kernel<<<static_cast<unsigned>(blocks), threads * rows_per_block, 0, stream>>>(
        x, xl, ref, rl, labels, rows, seq_len, vocab, ignore_index, t, logp, lse, ref_logp, ref_lse, kl, raw);
  };
  const bool warp_rows = vocab <= kWarpRowMaxVocab;
  const T* no_ref = nullptr;
#define DPO_FWD(V, REF, REF_PTR)                                                                                  \
  (warp_rows ? go(logits_forward_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(REF_PTR)>>, V, kWarp, \
                                        kWarpRowsPerBlock, REF, RAW>,                                             \
                  REF_PTR, kWarp, kWarpRowsPerBlock)                                                              \
             : go(logits_forward_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(REF_PTR)>>, V,       \
                                        kBlockThreads, 1, REF, RAW>,                                              \
                  REF_PTR, kBlockThreads, 1))
  if (vec) {
    if (with_ref) DPO_FWD(VEC, true, r); else DPO_FWD(VEC, false, no_ref);
  } else {
    if (with_ref) DPO_FWD(1, true, r); else DPO_FWD(1, false, no_ref);
  }
#undef DPO_FWD
  return static_cast<int>(cudaGetLastError());
}

// raw.stats non-null: the fold (RAW) kernels, else the finished forward.
template <typename T, typename TR>
int launch_forward(const T* x, RowLayout xl, const TR* r, RowLayout rl, const int64_t* labels, int64_t rows,
                   int64_t seq_len, int64_t vocab, int64_t ignore_index, TransformParams t, float* logp, float* lse,
                   float* ref_logp, float* ref_lse, float* kl, RawStats raw, cudaStream_t stream) {
  if (raw.stats != nullptr) {
    return launch_forward_as<true>(x, xl, r, rl, labels, rows, seq_len, vocab, ignore_index, t, logp, lse, ref_logp,
                                   ref_lse, kl, raw, stream);
  }
  return launch_forward_as<false>(x, xl, r, rl, labels, rows, seq_len, vocab, ignore_index, t, logp, lse, ref_logp,
                                  ref_lse, kl, raw, stream);
}

template <int VEC, typename T, typename TR>
int launch_backward_with(bool vec, const T* x, RowLayout xl, const TR* r, RowLayout rl, T* grad, RowLayout gl,
                         const int64_t* labels, const float* lse, const float* ref_lse, const float* g,
                         const float* g_kl, int64_t rows, int64_t seq_len, int64_t vocab, int64_t ignore_index,
                         TransformParams t, cudaStream_t stream) {
  const bool with_kl = g_kl != nullptr;
  if (rows == 0) return 0;  // a grid of 0 blocks is an invalid launch configuration
  auto go = [&](auto kernel, auto ref, int threads, int rows_per_block) {
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    kernel<<<static_cast<unsigned>(blocks), threads * rows_per_block, 0, stream>>>(
        x, xl, ref, rl, grad, gl, labels, lse, ref_lse, g, g_kl, rows, seq_len, vocab, ignore_index, t);
  };
  const bool warp_rows = vocab <= kWarpRowMaxVocab;
  const T* no_ref = nullptr;
#define DPO_BWD(V, KL, REF_PTR)                                                                                   \
  (warp_rows ? go(logits_backward_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(REF_PTR)>>, V,      \
                                         kWarp, kWarpRowsPerBlock, KL>,                                          \
                  REF_PTR, kWarp, kWarpRowsPerBlock)                                                              \
             : go(logits_backward_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(REF_PTR)>>, V,      \
                                         kBlockThreads, 1, KL>,                                                  \
                  REF_PTR, kBlockThreads, 1))
  if (vec) {
    if (with_kl) DPO_BWD(VEC, true, r); else DPO_BWD(VEC, false, no_ref);
  } else {
    if (with_kl) DPO_BWD(1, true, r); else DPO_BWD(1, false, no_ref);
  }
#undef DPO_BWD
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename TR>
int launch_backward(const T* x, RowLayout xl, const TR* r, RowLayout rl, T* grad, RowLayout gl,
                    const int64_t* labels, const float* lse, const float* ref_lse, const float* g, const float* g_kl,
                    int64_t rows, int64_t seq_len, int64_t vocab, int64_t ignore_index, TransformParams t,
                    cudaStream_t stream) {
  // packets of both rows with a KL gradient (16 bytes of the wider type, as in the forward), else of the policy's
  const bool with_kl = g_kl != nullptr;
  if (with_kl) {
    constexpr int VEC = packet_elems<T, TR>();
    const bool vec = packets_ok<VEC>(x, xl, sizeof(T)) && packets_ok<VEC>(grad, gl, sizeof(T)) &&
                     packets_ok<VEC>(r, rl, sizeof(TR));
    return launch_backward_with<VEC>(vec, x, xl, r, rl, grad, gl, labels, lse, ref_lse, g, g_kl, rows, seq_len, vocab,
                                     ignore_index, t, stream);
  }
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = packets_ok<VEC>(x, xl, sizeof(T)) && packets_ok<VEC>(grad, gl, sizeof(T));
  return launch_backward_with<VEC>(vec, x, xl, r, rl, grad, gl, labels, lse, ref_lse, g, g_kl, rows, seq_len, vocab,
                                   ignore_index, t, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace dpo_kernels

using dpo_kernels::TransformParams;
using dpo_kernels::cuda::RowLayout;

extern "C" int dpo_logits_forward(int dtype, const void* logits, int64_t stride_r, int64_t stride_t, int64_t stride_v,
                                  int ref_dtype, const void* ref_logits, int64_t ref_stride_r, int64_t ref_stride_t,
                                  int64_t ref_stride_v, const int64_t* labels, int64_t rows, int64_t seq_len,
                                  int64_t vocab, int64_t ignore_index, double logit_scale, double softcap,
                                  double inv_temperature, float* logp, float* lse, float* ref_logp, float* ref_lse,
                                  float* kl, float* stats, int64_t stats_stride, float* ref_stats,
                                  int64_t ref_stats_stride, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const RawStats raw{stats, stats_stride, ref_stats, ref_stats_stride};
  const TransformParams t{logit_scale, softcap, inv_temperature};
  const RowLayout xl{stride_r, stride_t, stride_v}, rl{ref_stride_r, ref_stride_t, ref_stride_v};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return with_element_type(dtype, [&](auto policy) {
    using T = decltype(policy);
    return with_element_type(ref_dtype, [&](auto ref) {
      using TR = decltype(ref);
      return launch_forward(static_cast<const T*>(logits), xl, static_cast<const TR*>(ref_logits), rl, labels, rows,
                            seq_len, vocab, ignore_index, t, logp, lse, ref_logp, ref_lse, kl, raw, s);
    });
  });
}

extern "C" int dpo_logits_backward(int dtype, const void* logits, int64_t stride_r, int64_t stride_t,
                                   int64_t stride_v, int ref_dtype, const void* ref_logits, int64_t ref_stride_r,
                                   int64_t ref_stride_t, int64_t ref_stride_v, void* grad, int64_t grad_stride_r,
                                   int64_t grad_stride_t, int64_t grad_stride_v, const int64_t* labels,
                                   const float* lse, const float* ref_lse, const float* g, const float* g_kl,
                                   int64_t rows, int64_t seq_len, int64_t vocab, int64_t ignore_index,
                                   double logit_scale, double softcap, double inv_temperature, intptr_t stream) {
  using namespace dpo_kernels::cuda;
  const TransformParams t{logit_scale, softcap, inv_temperature};
  const RowLayout xl{stride_r, stride_t, stride_v}, rl{ref_stride_r, ref_stride_t, ref_stride_v},
      gl{grad_stride_r, grad_stride_t, grad_stride_v};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return with_element_type(dtype, [&](auto policy) {
    using T = decltype(policy);
    return with_element_type(ref_dtype, [&](auto ref) {
      using TR = decltype(ref);
      return launch_backward(static_cast<const T*>(logits), xl, static_cast<const TR*>(ref_logits), rl,
                             static_cast<T*>(grad), gl, labels, lse, ref_lse, g, g_kl, rows, seq_len, vocab,
                             ignore_index, t, s);
    });
  });
}
