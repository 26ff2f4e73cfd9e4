// The linear (hidden states x head) primitives for the C++ backends, on any device: tokens x vocabulary tiles whose
// logits come from an ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA), folded by the fused `fold_tile` op and turned
// into gradients in place by `grad_tile`. Only one [token_chunk, vocab_chunk] tile (two with a reference) exists at
// a time; [N, V] is never built. Weight and bias gradients accumulate in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace dpo_kernels {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

at::ScalarType stats_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

bool present(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// Raw logits of one tile, h [n, D] already in the statistics dtype.
Tensor head_tile(const Tensor& h, const Tensor& weight, const OptTensor& bias, int64_t v0, int64_t v1) {
  const Tensor w = weight.slice(0, v0, v1).to(h.scalar_type());
  if (present(bias)) return at::addmm(bias->slice(0, v0, v1).to(h.scalar_type()), h, w.t());
  return at::mm(h, w.t());
}

void call_fold_tile(const Tensor& x, int64_t v0, const Tensor& labels, const Tensor& stats, const OptTensor& xr,
                    const OptTensor& ref_stats, double scale, double softcap, double inv_temp) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpo_kernels::fold_tile", "").typed<
      void(const Tensor&, int64_t, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, double,
           double)>();
  op.call(x, v0, labels, stats, xr, ref_stats, scale, softcap, inv_temp);
}

int64_t call_grad_tile(const Tensor& x, int64_t v0, const Tensor& labels, const Tensor& lse, const Tensor& g,
                       const OptTensor& xr, const OptTensor& ref_lse, const OptTensor& g_kl, double filter_eps,
                       double scale, double softcap, double inv_temp) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpo_kernels::grad_tile", "").typed<
      int64_t(const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, double, double, double, double)>();
  return op.call(x, v0, labels, lse, g, xr, ref_lse, g_kl, filter_eps, scale, softcap, inv_temp);
}

// hidden [N, D], weight [V, D], labels [N] -> (logp, lse, ref_logp, ref_lse, kl), each [N] (reference ones empty
// without a reference). Masked tokens get 0.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& labels,
    const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias, int64_t token_chunk,
    int64_t vocab_chunk, int64_t ignore_index, double scale, double softcap, double inv_temp) {
  const bool with_ref = present(ref_hidden);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto sdt = stats_type(hidden.scalar_type());
  const auto opts = hidden.options().dtype(sdt);
  const Tensor y = labels.to(at::kLong).contiguous();
  // rows: running max, running sum, label logit (+ for the reference: its three and the KL's weighted sum)
  Tensor stats = at::zeros({3, n}, opts);
  stats[0].fill_(-std::numeric_limits<double>::infinity());
  Tensor ref_stats = with_ref ? at::zeros({4, n}, opts) : Tensor();
  if (with_ref) ref_stats[0].fill_(-std::numeric_limits<double>::infinity());
  for (int64_t n0 = 0; n0 < n; n0 += token_chunk) {
    const int64_t n1 = std::min(n, n0 + token_chunk);
    const Tensor h = hidden.slice(0, n0, n1).to(sdt);
    const Tensor rh = with_ref ? ref_hidden->slice(0, n0, n1).to(sdt) : Tensor();
    const Tensor yb = y.slice(0, n0, n1);
    for (int64_t v0 = 0; v0 < vocab; v0 += vocab_chunk) {
      const int64_t v1 = std::min(vocab, v0 + vocab_chunk);
      const Tensor x = head_tile(h, weight, bias, v0, v1);
      OptTensor xr, rs;
      if (with_ref) {
        xr = head_tile(rh, *ref_weight, ref_bias, v0, v1);
        rs = ref_stats.slice(1, n0, n1);
      }
      call_fold_tile(x, v0, yb, stats.slice(1, n0, n1), xr, rs, scale, softcap, inv_temp);
    }
  }
  const Tensor mask = y != ignore_index;
  const Tensor zero = at::zeros({}, opts);
  const Tensor lse = stats[0] + stats[1].log();
  const Tensor logp = at::where(mask, stats[2] - lse, zero);
  if (!with_ref) return {logp, lse, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  const Tensor ref_lse = ref_stats[0] + ref_stats[1].log();
  const Tensor ref_logp = at::where(mask, ref_stats[2] - ref_lse, zero);
  const Tensor kl = at::where(mask, ref_stats[3] / ref_stats[1] - ref_lse + lse, zero);
  return {logp, lse, ref_logp, ref_lse, kl};
}

// Recomputes every tile; returns (dH [N, D] in hidden's dtype, dW [V, D] and db [V] in the parameters' dtypes),
// empty tensors for gradients not asked for. g and g_kl must already be 0 at masked tokens.
std::tuple<Tensor, Tensor, Tensor> linear_backward(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& labels, const Tensor& lse,
    const Tensor& g, const OptTensor& ref_hidden, const OptTensor& ref_weight, const OptTensor& ref_bias,
    const OptTensor& ref_lse, const OptTensor& g_kl, bool need_dh, bool need_dw, bool need_db, int64_t token_chunk,
    int64_t vocab_chunk, double filter_eps, double scale, double softcap, double inv_temp) {
  const bool with_kl = present(g_kl);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto sdt = stats_type(hidden.scalar_type());
  const auto opts = hidden.options().dtype(sdt);
  const Tensor y = labels.to(at::kLong).contiguous();
  Tensor dh = need_dh ? at::empty({n, hidden.size(1)}, hidden.options()) : Tensor();
  Tensor dw = need_dw ? at::zeros({vocab, weight.size(1)}, opts) : Tensor();
  Tensor db = need_db ? at::zeros({vocab}, opts) : Tensor();
  for (int64_t n0 = 0; n0 < n; n0 += token_chunk) {
    const int64_t n1 = std::min(n, n0 + token_chunk);
    const Tensor h = hidden.slice(0, n0, n1).to(sdt);
    const Tensor rh = with_kl ? ref_hidden->slice(0, n0, n1).to(sdt) : Tensor();
    Tensor dh_block = need_dh ? at::zeros({n1 - n0, hidden.size(1)}, opts) : Tensor();
    for (int64_t v0 = 0; v0 < vocab; v0 += vocab_chunk) {
      const int64_t v1 = std::min(vocab, v0 + vocab_chunk);
      Tensor x = head_tile(h, weight, bias, v0, v1);
      OptTensor xr, rl, gk;
      if (with_kl) {
        xr = head_tile(rh, *ref_weight, ref_bias, v0, v1);
        rl = ref_lse->slice(0, n0, n1);
        gk = g_kl->slice(0, n0, n1);
      }
      const int64_t kept = call_grad_tile(x, v0, y.slice(0, n0, n1), lse.slice(0, n0, n1), g.slice(0, n0, n1), xr,
                                          rl, gk, filter_eps, scale, softcap, inv_temp);
      if (!kept) continue;  // every |p - onehot| of the tile below grad_filter_eps
      if (need_dh) dh_block.addmm_(x, weight.slice(0, v0, v1).to(sdt));
      if (need_dw) dw.slice(0, v0, v1).addmm_(x.t(), h);
      if (need_db) db.slice(0, v0, v1).add_(x.sum(0));
    }
    if (need_dh) dh.slice(0, n0, n1).copy_(dh_block);
  }
  return {dh, need_dw ? dw.to(weight.scalar_type()) : dw, need_db ? db.to(bias->scalar_type()) : db};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CompositeExplicitAutograd, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
}

}  // namespace dpo_kernels
