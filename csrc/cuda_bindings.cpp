// CUDA implementations of the dpo_kernels ops: argument checks, then the torch-free launchers of csrc/cuda/ with raw
// pointers and the current stream. Compiled to nothing unless setup.py builds with CUDA (DPO_KERNELS_WITH_CUDA).
#ifdef DPO_KERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "stats_layout.h"

namespace dpo_kernels {
namespace cuda_ops {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DPO_FLOAT32;
    case at::kHalf:
      return DPO_FLOAT16;
    case at::kBFloat16:
      return DPO_BFLOAT16;
    default:
      TORCH_CHECK(false, "backend='cuda' takes float16, bfloat16 or float32 tensors, got ", t.scalar_type());
  }
}

bool present(const OptTensor& t) {
  return t.has_value() && t->defined();
}

intptr_t stream() {
  return reinterpret_cast<intptr_t>(c10::cuda::getCurrentCUDAStream().stream());
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "dpo_kernels CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> logits_forward(const Tensor& logits, const Tensor& labels,
                                                                  const OptTensor& ref_logits, int64_t ignore_index,
                                                                  double logit_scale, double softcap,
                                                                  double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool with_ref = present(ref_logits);
  const int64_t n = logits.size(0) * logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  Tensor ref_logp = at::empty({with_ref ? n : 0}, opts), ref_lse = at::empty({with_ref ? n : 0}, opts);
  Tensor kl = at::empty({with_ref ? n : 0}, opts);
  const Tensor y = labels.reshape({-1}).to(at::kLong).contiguous();
  const Tensor& r = with_ref ? *ref_logits : logits;
  check(dpo_logits_forward(dtype_code(logits), logits.data_ptr(), logits.stride(0), logits.stride(1),
                           logits.stride(2), dtype_code(r), with_ref ? r.data_ptr() : nullptr, r.stride(0),
                           r.stride(1), r.stride(2),
                           y.data_ptr<int64_t>(), n, logits.size(1), logits.size(2), ignore_index, logit_scale,
                           softcap, inv_temperature, logp.data_ptr<float>(), lse.data_ptr<float>(),
                           with_ref ? ref_logp.data_ptr<float>() : nullptr,
                           with_ref ? ref_lse.data_ptr<float>() : nullptr, with_ref ? kl.data_ptr<float>() : nullptr,
                           nullptr, 0, nullptr, 0, stream()),
        "logits_forward");
  return {logp, lse, ref_logp, ref_lse, kl};
}

void logits_fold(const Tensor& logits, const Tensor& labels, const Tensor& stats, const OptTensor& ref_logits,
                 const OptTensor& ref_stats, int64_t ignore_index, double logit_scale, double softcap,
                 double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool with_ref = present(ref_logits);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.size(0) == kStatRows &&
                  (!with_ref || (ref_stats->scalar_type() == at::kFloat && ref_stats->size(0) == kRefStatRows)),
              "dpo_kernels::logits_fold: stats must be fp32 [3, n] and ref_stats fp32 [4, n]");
  const int64_t n = logits.size(0) * logits.size(1);
  const Tensor y = labels.reshape({-1}).to(at::kLong).contiguous();
  const Tensor& r = with_ref ? *ref_logits : logits;
  check(dpo_logits_forward(dtype_code(logits), logits.data_ptr(), logits.stride(0), logits.stride(1),
                           logits.stride(2), dtype_code(r), with_ref ? r.data_ptr() : nullptr, r.stride(0),
                           r.stride(1), r.stride(2), y.data_ptr<int64_t>(), n, logits.size(1), logits.size(2),
                           ignore_index, logit_scale, softcap, inv_temperature, nullptr, nullptr, nullptr, nullptr,
                           nullptr, stats.data_ptr<float>(), stats.stride(0),
                           with_ref ? ref_stats->data_ptr<float>() : nullptr, with_ref ? ref_stats->stride(0) : 0,
                           stream()),
        "logits_fold");
}

void logits_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& g,
                     const OptTensor& ref_logits, const OptTensor& ref_lse, const OptTensor& g_kl, const Tensor& grad,
                     int64_t ignore_index, double logit_scale, double softcap, double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "dpo_kernels::logits_backward: grad must match logits");
  const bool with_kl = present(g_kl);
  const int64_t n = logits.size(0) * logits.size(1);
  const Tensor y = labels.reshape({-1}).to(at::kLong).contiguous();
  const Tensor& r = with_kl ? *ref_logits : logits;
  check(dpo_logits_backward(dtype_code(logits), logits.data_ptr(), logits.stride(0), logits.stride(1),
                            logits.stride(2), dtype_code(r), with_kl ? r.data_ptr() : nullptr, r.stride(0),
                            r.stride(1), r.stride(2),
                            grad.data_ptr(), grad.stride(0), grad.stride(1), grad.stride(2), y.data_ptr<int64_t>(),
                            lse.data_ptr<float>(), with_kl ? ref_lse->data_ptr<float>() : nullptr,
                            g.data_ptr<float>(), with_kl ? g_kl->data_ptr<float>() : nullptr, n, logits.size(1),
                            logits.size(2), ignore_index, logit_scale, softcap, inv_temperature, stream()),
        "logits_backward");
}

const float* float_data(const OptTensor& t) {
  return present(t) ? t->data_ptr<float>() : nullptr;
}

void check_tile(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "dpo_kernels::", what,
              ": the CUDA tile kernels take contiguous fp32 tiles (the GEMM output), got ", t.scalar_type());
}

void check_stats_rows(const Tensor& stats, bool logging) {
  // what the kernels would otherwise read past, said here
  TORCH_CHECK(stats.size(0) == dpo_kernels::stat_rows(logging), "dpo_kernels::fold_tile: stats must have ",
              dpo_kernels::stat_rows(logging), " rows with logging=", logging, " (csrc/stats_layout.h), got ",
              stats.size(0));
}

DpoTile tile_of(const Tensor& x, const OptTensor& bias, int64_t v0, const Tensor& labels) {
  return DpoTile{x.data_ptr<float>(), float_data(bias), x.size(0), x.size(1), v0, labels.data_ptr<int64_t>()};
}

// The reference's tile beside the policy's (same tokens and columns); x NULL when there is none.
DpoTile ref_tile_of(const OptTensor& xr, const OptTensor& ref_bias, const DpoTile& tile) {
  return DpoTile{present(xr) ? xr->data_ptr<float>() : nullptr, float_data(ref_bias), tile.n, tile.width, tile.v0,
                 tile.labels};
}

void fold_tile(const Tensor& x, const OptTensor& bias, int64_t v0, const Tensor& labels, const Tensor& stats,
               bool logging, const OptTensor& xr, const OptTensor& ref_bias, const OptTensor& ref_stats,
               double logit_scale, double softcap, double inv_temperature) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_tile(x, "fold_tile");
  const bool with_ref = present(xr);
  if (with_ref) check_tile(*xr, "fold_tile");
  check_stats_rows(stats, logging);
  const DpoTile tile = tile_of(x, bias, v0, labels);
  check(dpo_fold_tile(tile, ref_tile_of(xr, ref_bias, tile), stats.data_ptr<float>(), stats.stride(0), logging,
                      with_ref ? ref_stats->data_ptr<float>() : nullptr, with_ref ? ref_stats->stride(0) : 0,
                      DpoTransform{logit_scale, softcap, inv_temperature}, stream()),
        "fold_tile");
}

// The weights a second launch writes after fold_tile (fold_tile_weights, fold_tile_shifted; the op `what`): tiles of
// x's shape, contiguous, the reference's of the same dtype and beside its tile; at most 2^31 - 1 tokens (a grid
// dimension).
void check_weights(const char* what, const Tensor& x, const OptTensor& xr, const Tensor& weights,
                   const OptTensor& ref_weights) {
  TORCH_CHECK(weights.sizes() == x.sizes() && weights.is_contiguous() &&
                  (!present(ref_weights) || (ref_weights->sizes() == x.sizes() && ref_weights->is_contiguous() &&
                                             ref_weights->scalar_type() == weights.scalar_type() && present(xr))),
              "dpo_kernels::", what, ": weights (and ref_weights, with a reference) must be contiguous tiles of x's "
              "shape, of one dtype");
  TORCH_CHECK(x.size(0) <= INT32_MAX, "dpo_kernels::", what, ": a tile holds at most 2^31 - 1 tokens");
}

// fold_tile, then a second launch writing a frozen head's softmax weights (the schema's doc in bindings.cpp).
void fold_tile_weights(const Tensor& x, const OptTensor& bias, int64_t v0, const Tensor& labels, const Tensor& stats,
                       const OptTensor& xr, const OptTensor& ref_bias, const OptTensor& ref_stats,
                       const Tensor& weights, const OptTensor& ref_weights, double logit_scale, double softcap,
                       double inv_temperature) {
  // the logging rows, when the statistics were allocated with them (stats_layout.h), are folded as fold_tile's
  const bool logging = stats.size(0) == dpo_kernels::stat_rows(true);
  fold_tile(x, bias, v0, labels, stats, logging, xr, ref_bias, ref_stats, logit_scale, softcap, inv_temperature);
  const bool with_ref_weights = present(ref_weights);
  check_weights("fold_tile_weights", x, xr, weights, ref_weights);
  const DpoTile tile = tile_of(x, bias, v0, labels);
  check(dpo_fold_weights(dtype_code(weights), tile,
                         with_ref_weights ? ref_tile_of(xr, ref_bias, tile) : ref_tile_of({}, {}, tile),
                         stats.data_ptr<float>(), stats.stride(0),
                         with_ref_weights ? ref_stats->data_ptr<float>() : nullptr,
                         with_ref_weights ? ref_stats->stride(0) : 0, weights.data_ptr(),
                         with_ref_weights ? ref_weights->data_ptr() : nullptr,
                         DpoTransform{logit_scale, softcap, inv_temperature}, stream()),
        "fold_tile_weights");
}

// fold_tile, then a second launch taking the weights at each row's shift (the schema's doc in bindings.cpp).
void fold_tile_shifted(const Tensor& x, const OptTensor& bias, int64_t v0, const Tensor& labels, const Tensor& stats,
                       const OptTensor& xr, const OptTensor& ref_bias, const OptTensor& ref_stats,
                       const Tensor& weights, const OptTensor& ref_weights, const OptTensor& acc, const Tensor& shift,
                       const OptTensor& ref_acc, const OptTensor& ref_shift, const OptTensor& shift_out,
                       const OptTensor& ref_shift_out, double headroom, double logit_scale, double softcap,
                       double inv_temperature) {
  const bool with_ref_weights = present(ref_weights), sums = present(acc);
  const Tensor& out = present(shift_out) ? *shift_out : shift;
  const int64_t n = x.size(0);
  auto shift_ok = [&](const Tensor& t) {
    return t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous();
  };
  auto sums_ok = [&](const OptTensor& a) {
    return !sums || (present(a) && a->scalar_type() == at::kFloat && a->dim() == 2 && a->size(0) == n &&
                     a->stride(1) == 1 && a->stride(0) == acc->stride(0) && a->size(1) == acc->size(1));
  };
  TORCH_CHECK(shift_ok(shift) && shift_ok(out) && sums_ok(acc) &&
                  (!with_ref_weights || (present(ref_shift) && shift_ok(*ref_shift) && sums_ok(ref_acc) &&
                                         (!present(ref_shift_out) || shift_ok(*ref_shift_out)))) &&
                  (with_ref_weights || !present(ref_acc)),
              "dpo_kernels::fold_tile_shifted: each shift must be a contiguous fp32 [n] tensor and the sums fp32 "
              "[n, D] with contiguous rows of one stride (the reference's with its weights)");
  check_weights("fold_tile_shifted", x, xr, weights, ref_weights);
  const bool logging = stats.size(0) == dpo_kernels::stat_rows(true);
  fold_tile(x, bias, v0, labels, stats, logging, xr, ref_bias, ref_stats, logit_scale, softcap, inv_temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const DpoTile tile = tile_of(x, bias, v0, labels);
  check(dpo_fold_shifted(dtype_code(weights), tile,
                         with_ref_weights ? ref_tile_of(xr, ref_bias, tile) : ref_tile_of({}, {}, tile),
                         stats.data_ptr<float>(), stats.stride(0),
                         with_ref_weights ? ref_stats->data_ptr<float>() : nullptr,
                         with_ref_weights ? ref_stats->stride(0) : 0, weights.data_ptr(),
                         with_ref_weights ? ref_weights->data_ptr() : nullptr,
                         sums ? acc->data_ptr<float>() : nullptr, shift.data_ptr<float>(),
                         sums && with_ref_weights ? ref_acc->data_ptr<float>() : nullptr,
                         with_ref_weights ? ref_shift->data_ptr<float>() : nullptr, out.data_ptr<float>(),
                         !with_ref_weights           ? nullptr
                         : present(ref_shift_out) ? ref_shift_out->data_ptr<float>()
                                                  : ref_shift->data_ptr<float>(),
                         sums ? acc->stride(0) : 0,
                         sums ? acc->size(1) : 0, headroom, DpoTransform{logit_scale, softcap, inv_temperature},
                         stream()),
        "fold_tile_shifted");
}

void scaled_grad_tile(const Tensor& weights, const Tensor& maxes, const Tensor& label_logits, int64_t v0,
                      const Tensor& labels, const Tensor& lse, const Tensor& g, const OptTensor& ref_weights,
                      const OptTensor& ref_maxes, const OptTensor& ref_label_logits, const OptTensor& ref_lse,
                      const OptTensor& g_kl, const Tensor& out, double logit_scale, double softcap,
                      double inv_temperature) {
  const c10::cuda::CUDAGuard guard(weights.device());
  const bool with_ref = present(ref_weights);
  TORCH_CHECK(weights.scalar_type() == at::kHalf && weights.dim() == 2 && weights.is_contiguous() &&
                  (!with_ref || (ref_weights->scalar_type() == at::kHalf && ref_weights->sizes() == weights.sizes() &&
                                 ref_weights->is_contiguous() && present(ref_maxes) && present(ref_label_logits) &&
                                 present(ref_lse) && present(g_kl))),
              "dpo_kernels::scaled_grad_tile: the CUDA kernel takes contiguous fp16 weights [n, w] (and the "
              "reference's, with every reference argument)");
  TORCH_CHECK(out.sizes() == weights.sizes() && out.stride(1) == 1, "dpo_kernels::scaled_grad_tile: out must be "
              "[n, w] with contiguous rows");
  TORCH_CHECK(weights.size(0) <= INT32_MAX, "dpo_kernels::scaled_grad_tile: a tile holds at most 2^31 - 1 tokens");
  const Tensor m_c = maxes.contiguous(), zy_c = label_logits.contiguous(), lse_c = lse.contiguous(),
               g_c = g.contiguous(), y_c = labels.contiguous();
  const Tensor mr_c = with_ref ? ref_maxes->contiguous() : Tensor();
  const Tensor zry_c = with_ref ? ref_label_logits->contiguous() : Tensor();
  const Tensor rlse_c = with_ref ? ref_lse->contiguous() : Tensor();
  const Tensor gkl_c = with_ref ? g_kl->contiguous() : Tensor();
  check(dpo_scaled_grad(dtype_code(out), weights.data_ptr(), with_ref ? ref_weights->data_ptr() : nullptr,
                        m_c.data_ptr<float>(), with_ref ? mr_c.data_ptr<float>() : nullptr, zy_c.data_ptr<float>(),
                        with_ref ? zry_c.data_ptr<float>() : nullptr, y_c.data_ptr<int64_t>(), weights.size(0),
                        weights.size(1), v0, lse_c.data_ptr<float>(), with_ref ? rlse_c.data_ptr<float>() : nullptr,
                        g_c.data_ptr<float>(), with_ref ? gkl_c.data_ptr<float>() : nullptr, out.data_ptr(),
                        out.stride(0), DpoTransform{logit_scale, softcap, inv_temperature}, stream()),
        "scaled_grad_tile");
}

int64_t grad_tile(const Tensor& x, const OptTensor& bias, int64_t v0, const Tensor& labels, const Tensor& lse,
                  const Tensor& g, const OptTensor& xr, const OptTensor& ref_bias, const OptTensor& ref_lse,
                  const OptTensor& g_kl, const Tensor& out, double filter_eps, double logit_scale, double softcap,
                  double inv_temperature) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_tile(x, "grad_tile");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous(), "dpo_kernels::grad_tile: out must be a contiguous "
              "tile of x's shape");
  const bool with_kl = present(g_kl);
  if (with_kl) check_tile(*xr, "grad_tile");
  TORCH_CHECK(x.size(0) <= INT32_MAX, "dpo_kernels::grad_tile: a tile holds at most 2^31 - 1 tokens (its grid's "
              "first dimension), got ", x.size(0), "; a smaller tile_budget_mb or token_chunk_size splits them");
  const Tensor lse_c = lse.contiguous(), g_c = g.contiguous();
  const Tensor ref_lse_c = with_kl ? ref_lse->contiguous() : Tensor();
  const Tensor g_kl_c = with_kl ? g_kl->contiguous() : Tensor();
  const DpoTile tile = tile_of(x, bias, v0, labels);
  int kept = 1;
  check(dpo_grad_tile(dtype_code(out), tile, with_kl ? ref_tile_of(xr, ref_bias, tile) : ref_tile_of({}, {}, tile),
                      lse_c.data_ptr<float>(), g_c.data_ptr<float>(), with_kl ? ref_lse_c.data_ptr<float>() : nullptr,
                      with_kl ? g_kl_c.data_ptr<float>() : nullptr, out.data_ptr(), filter_eps,
                      DpoTransform{logit_scale, softcap, inv_temperature}, &kept, stream()),
        "grad_tile");
  return kept;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("logits_forward", &logits_forward);
  m.impl("logits_fold", &logits_fold);
  m.impl("logits_backward", &logits_backward);
  m.impl("fold_tile", &fold_tile);
  m.impl("fold_tile_weights", &fold_tile_weights);
  m.impl("fold_tile_shifted", &fold_tile_shifted);
  m.impl("scaled_grad_tile", &scaled_grad_tile);
  m.impl("grad_tile", &grad_tile);
}

}  // namespace cuda_ops
}  // namespace dpo_kernels

#endif  // DPO_KERNELS_WITH_CUDA
