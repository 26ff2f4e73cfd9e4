// The one place where the dpo_kernels ops are declared. Implementations register per device: cpu/ops_cpu.cpp
// (CPU) and cuda_bindings.cpp (CUDA, when built with it).
// Python reaches them as torch.ops.dpo_kernels.<name> once dpo_kernels._C is imported.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(dpo_kernels, m) {
  // Softcap <= 0 means none; masked tokens (label == ignore_index) get 0 statistics.
  m.def(
      "logits_forward(Tensor logits, Tensor labels, Tensor? ref_logits, int ignore_index, float logit_scale, "
      "float softcap, float inv_temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The named statistics (stats_layout.h) of each row over all its columns, folded into stats [3, R*T] and
  // ref_stats [4, R*T] (statistics dtype): a vocabulary slice of the logits; a label outside [0, V) adds no label
  // logit, a row whose label is ignore_index is not read.
  m.def(
      "logits_fold(Tensor logits, Tensor labels, Tensor(a!) stats, Tensor? ref_logits, Tensor(b!)? ref_stats, "
      "int ignore_index, float logit_scale, float softcap, float inv_temperature) -> ()");
  // grad may be logits itself (inplace_backward): every element is read before it is written.
  m.def(
      "logits_backward(Tensor logits, Tensor labels, Tensor lse, Tensor g, Tensor? ref_logits, Tensor? ref_lse, "
      "Tensor? g_kl, Tensor(a!) grad, int ignore_index, float logit_scale, float softcap, float inv_temperature) -> ()");
  // Linear path, one tile of raw logits x [n, w] (fp32, or fp64 for fp64 inputs) of vocabulary columns v0..v0+w,
  // every label valid; bias [w] in x's dtype. The tile loop is dpo_kernels/ops/linear/loop.py.
  // stats [3, n]: max, sum, label logit (with logging [7, n], the logged sums follow; stats_layout.h); ref_stats
  // [4, n]: the reference's max, sum, label logit, KL weighted sum.
  m.def(
      "fold_tile(Tensor x, Tensor? bias, int v0, Tensor labels, Tensor(a!) stats, bool logging, Tensor? xr, "
      "Tensor? ref_bias, "
      "Tensor(b!)? ref_stats, float logit_scale, float softcap, float inv_temperature) -> ()");
  // fold_tile for a frozen head or the eager schedule's scaled store: also writes the softmax weights e^{z - m'} t'(x)
  // of the tile after the fold into weights [n, w] (contiguous; x's dtype, then may be x itself, or a narrower float
  // dtype, rounded once), and with ref_weights the reference's e^{zr - m_r'} t'(x) (ops/linear/sources.py).
  m.def(
      "fold_tile_weights(Tensor x, Tensor? bias, int v0, Tensor labels, Tensor(a!) stats, Tensor? xr, "
      "Tensor? ref_bias, Tensor(b!)? ref_stats, Tensor(c!) weights, Tensor(d!)? ref_weights, float logit_scale, "
      "float softcap, float inv_temperature) -> ()");
  // fold_tile_weights at shifts (dpo_kernels/ops/linear/contract.py's fold_shifted): each row's weights are taken at
  // its shift s' (shift [n], contiguous; the reference's in ref_shift) instead of its max: s' = s unless the row's
  // max after the tile m' > s + headroom, then s' = m'; where s' moved from a finite s, the row of acc [n, D] (rows
  // contiguous; none for a scaled store) is scaled by e^{s - s'}; s' is written to shift_out ([n], contiguous; none:
  // over shift; the reference's to ref_shift_out). weights (ref_weights) may be x (xr) itself in x's dtype.
  m.def(
      "fold_tile_shifted(Tensor x, Tensor? bias, int v0, Tensor labels, Tensor(a!) stats, Tensor? xr, "
      "Tensor? ref_bias, Tensor(b!)? ref_stats, Tensor(c!) weights, Tensor(d!)? ref_weights, Tensor(e!)? acc, "
      "Tensor(f!) shift, Tensor(g!)? ref_acc, Tensor(h!)? ref_shift, Tensor(i!)? shift_out, "
      "Tensor(j!)? ref_shift_out, float headroom, float logit_scale, float softcap, float inv_temperature) -> ()");
  // dZ of a tile kept as its fp16 softmax weights (contract.py's scaled_grad and ScaledTile): weights [n, w]
  // contiguous, maxes / label_logits / lse / g [n] in the statistics dtype, the reference's beside with g_kl; out
  // [n, w] (rows contiguous, any row stride, any float dtype).
  m.def(
      "scaled_grad_tile(Tensor weights, Tensor maxes, Tensor label_logits, int v0, Tensor labels, Tensor lse, "
      "Tensor g, Tensor? ref_weights, Tensor? ref_maxes, Tensor? ref_label_logits, Tensor? ref_lse, Tensor? g_kl, "
      "Tensor(a!) out, float logit_scale, float softcap, float inv_temperature) -> ()");
  // Writes dL/dx into out [n, w] (any float dtype; may be x itself). Returns 0 when filter_eps >= 0 and every
  // |p - onehot| (and |p - q|) of the tile is below it (out is then unspecified), else 1.
  m.def(
      "grad_tile(Tensor x, Tensor? bias, int v0, Tensor labels, Tensor lse, Tensor g, Tensor? xr, Tensor? ref_bias, "
      "Tensor? ref_lse, Tensor? g_kl, Tensor(a!) out, float filter_eps, float logit_scale, float softcap, "
      "float inv_temperature) -> int");
}

// Reports what this build contains, for the backend availability check.
static bool built_with_cuda() {
#ifdef DPO_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled into this build");
}
