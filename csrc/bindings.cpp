// The one place where the dpo_kernels ops are declared. Implementations register per device: cpu/ops_cpu.cpp
// (CPU), cuda_bindings.cpp (CUDA, when built with it), linear.cpp (any device, on top of the tile ops).
// Python reaches them as torch.ops.dpo_kernels.<name> once dpo_kernels._C is imported.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(dpo_kernels, m) {
  // Softcap <= 0 means none; masked tokens (label == ignore_index) get 0 statistics.
  m.def(
      "logits_forward(Tensor logits, Tensor labels, Tensor? ref_logits, int ignore_index, float logit_scale, "
      "float softcap, float inv_temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad may be logits itself (inplace_backward): every element is read before it is written.
  m.def(
      "logits_backward(Tensor logits, Tensor labels, Tensor lse, Tensor g, Tensor? ref_logits, Tensor? ref_lse, "
      "Tensor? g_kl, Tensor(a!) grad, int ignore_index, float logit_scale, float softcap, float inv_temperature) -> ()");
  m.def(
      "fold_tile(Tensor x, int v0, Tensor labels, Tensor(a!) stats, Tensor? xr, Tensor(b!)? ref_stats, "
      "float logit_scale, float softcap, float inv_temperature) -> ()");
  m.def(
      "grad_tile(Tensor(a!) x, int v0, Tensor labels, Tensor lse, Tensor g, Tensor? xr, Tensor? ref_lse, "
      "Tensor? g_kl, float filter_eps, float logit_scale, float softcap, float inv_temperature) -> int");
  m.def(
      "linear_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, "
      "Tensor? ref_weight, Tensor? ref_bias, int token_chunk, int vocab_chunk, int ignore_index, float logit_scale, "
      "float softcap, float inv_temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, Tensor g, "
      "Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, Tensor? ref_lse, Tensor? g_kl, bool need_dh, "
      "bool need_dw, bool need_db, int token_chunk, int vocab_chunk, float filter_eps, float logit_scale, "
      "float softcap, float inv_temperature) -> (Tensor, Tensor, Tensor)");
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
