// Host entry points of the CUDA kernels. Plain C: raw pointers, element strides and the CUDA stream as an integer,
// so that the kernels compile and link without torch (csrc/cuda_bindings.cpp is the only torch-facing caller).
// Every function returns a cudaError_t value (0 on success).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of the logits / tiles
enum DpoDtype { DPO_FLOAT32 = 0, DPO_FLOAT16 = 1, DPO_BFLOAT16 = 2 };  // the CUDA kernels take no fp64

// Logits [R, T, V] with strides (stride_r, stride_t, stride_v); labels [R*T] int64; outputs [R*T] fp32.
// ref_logits (of dtype ref_dtype, which may differ from dtype) may be NULL (then ref_logp, ref_lse, kl are not
// written). stats non-NULL: the fold of a vocabulary slice instead, each row's named statistics (stats_layout.h)
// written to stats [3, R*T] and ref_stats [4, R*T] (row strides given; a label outside [0, vocab) adds no label
// logit, a masked row writes nothing) and none of logp .. kl.
int dpo_logits_forward(int dtype, const void* logits, int64_t stride_r, int64_t stride_t, int64_t stride_v,
                       int ref_dtype, const void* ref_logits, int64_t ref_stride_r, int64_t ref_stride_t,
                       int64_t ref_stride_v,
                       const int64_t* labels, int64_t rows, int64_t seq_len, int64_t vocab, int64_t ignore_index,
                       double logit_scale, double softcap, double inv_temperature, float* logp, float* lse,
                       float* ref_logp, float* ref_lse, float* kl, float* stats, int64_t stats_stride,
                       float* ref_stats, int64_t ref_stats_stride, intptr_t stream);

// Writes g (onehot - p) + g_kl (p - q) through the transform into grad (may equal logits: in-place backward).
// ref_logits, ref_lse, g_kl may be NULL (no KL gradient). g, g_kl are 0 at masked tokens.
int dpo_logits_backward(int dtype, const void* logits, int64_t stride_r, int64_t stride_t, int64_t stride_v,
                        int ref_dtype, const void* ref_logits, int64_t ref_stride_r, int64_t ref_stride_t,
                        int64_t ref_stride_v,
                        void* grad, int64_t grad_stride_r, int64_t grad_stride_t, int64_t grad_stride_v,
                        const int64_t* labels, const float* lse, const float* ref_lse, const float* g,
                        const float* g_kl, int64_t rows, int64_t seq_len, int64_t vocab, int64_t ignore_index,
                        double logit_scale, double softcap, double inv_temperature, intptr_t stream);

// Tiles of the linear path. A tile is a contiguous [n, width] fp32 block of raw logits x of vocabulary columns
// v0..v0+width with its bias [width] fp32 (or NULL) and the labels [n] of its tokens, every one a valid id. The
// reference's tile has the same n, width, v0 and labels (only its x and bias are read); x NULL: no reference.
typedef struct {
  const float* x;
  const float* bias;
  int64_t n;
  int64_t width;
  int64_t v0;
  const int64_t* labels;
} DpoTile;

// The logit transform (csrc/transform.h): softcap <= 0 when unused.
typedef struct {
  double logit_scale;
  double softcap;
  double inv_temperature;
} DpoTransform;

// stats rows (stride stats_stride; csrc/stats_layout.h): max, sum, label logit, and with logging the logged sums
// (sum e^{z-m} z, sum e^{2(z-m)}, sum z, max z left of the label; policy only); ref_stats rows: max, sum, label
// logit, w.
int dpo_fold_tile(DpoTile tile, DpoTile ref, float* stats, int64_t stats_stride, int logging, float* ref_stats,
                  int64_t ref_stats_stride, DpoTransform transform, intptr_t stream);

// Writes dL/dx into out, a contiguous [n, width] tile of dtype out_dtype (fp32, fp16 or bf16; may be tile.x for
// fp32), from lse and g [n] (and, for the KL gradient, the reference's ref_lse and g_kl [n]; ref.x, ref_lse, g_kl
// NULL: no KL gradient, the reference is not read). With filter_eps >= 0, *kept (host) is set to 0 when every
// |p - onehot| (and |p - q|) of the tile is below filter_eps (this synchronises the stream); otherwise *kept = 1
// without synchronising.
int dpo_grad_tile(int out_dtype, DpoTile tile, DpoTile ref, const float* lse, const float* g, const float* ref_lse,
                  const float* g_kl, void* out, double filter_eps, DpoTransform transform, int* kept,
                  intptr_t stream);

// fold_weights' second pass, after dpo_fold_tile wrote the tile's new maxima into stats (and ref_stats): writes a
// frozen head's softmax weights e^{z - m'} t'(x) into weights, a contiguous [n, width] tile of dtype weights_dtype
// (may be tile.x for fp32), and with ref_weights (NULL: none) e^{zr - mr'} t'(x) with the policy's slope.
int dpo_fold_weights(int weights_dtype, DpoTile tile, DpoTile ref, const float* stats, int64_t stats_stride,
                     const float* ref_stats, int64_t ref_stats_stride, void* weights, void* ref_weights,
                     DpoTransform transform, intptr_t stream);

// fold_shifted's second pass (dpo_kernels/ops/linear/contract.py), after dpo_fold_tile wrote the tile's new maxima
// into stats (and ref_stats): each row's shift (shift [n]) moves to its max m' where m' > shift + headroom; the
// weights e^{z - s'} t'(x) are written as dpo_fold_weights writes them (may be tile.x for fp32), and with
// ref_weights (NULL: none) e^{zr - s_r'} t'(x) at the reference's shift (ref_shift); where a shift moved from a
// finite value, the row of acc [n, dim] (row stride acc_stride; NULL: no sums, a scaled store) is scaled by
// e^{s - s'} (ref_acc likewise, NULL exactly when acc is); s' is stored in shift_out (ref_shift_out), which may be
// shift (ref_shift) itself.
int dpo_fold_shifted(int weights_dtype, DpoTile tile, DpoTile ref, const float* stats, int64_t stats_stride,
                     const float* ref_stats, int64_t ref_stats_stride, void* weights, void* ref_weights, float* acc,
                     const float* shift, float* ref_acc, const float* ref_shift, float* shift_out,
                     float* ref_shift_out, int64_t acc_stride, int64_t dim, double headroom, DpoTransform transform,
                     intptr_t stream);

// dZ of a tile kept as fp16 softmax weights (the eager schedule's scaled store): weights (and ref_weights, NULL: no
// KL gradient) contiguous [n, width] fp16, their shifts maxes (ref_maxes) [n], the label logits, labels [n] (columns
// v0..v0+width of theirs are written exactly), lse, g (ref_lse, g_kl) [n]; out [n, width] of out_dtype with row
// stride out_stride.
int dpo_scaled_grad(int out_dtype, const void* weights, const void* ref_weights, const float* maxes,
                    const float* ref_maxes, const float* label_logits, const float* ref_label_logits,
                    const int64_t* labels, int64_t n, int64_t width, int64_t v0, const float* lse,
                    const float* ref_lse, const float* g, const float* g_kl, void* out, int64_t out_stride,
                    DpoTransform transform, intptr_t stream);

#ifdef __cplusplus
}
#endif
