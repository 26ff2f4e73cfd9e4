// CPU implementations of the dpo_kernels ops: OpenMP over rows (at::parallel_for), at::vec inner loops, one pass
// over each logits row with an online log-sum-exp, fp32 statistics for fp16/bf16/fp32 inputs (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../stats_layout.h"
#include "row_kernels.h"

namespace dpo_kernels {
namespace cpu {
namespace {

using at::Tensor;

TransformParams make_transform(double logit_scale, double softcap, double inv_temperature) {
  return TransformParams{logit_scale, softcap, inv_temperature};
}

// fp32 statistics, fp64 when either the policy's or the reference's logits are fp64.
at::ScalarType stats_type(at::ScalarType input, at::ScalarType ref) {
  return input == at::kDouble || ref == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename policy_t, typename ref_t>
using pair_acc_t = std::conditional_t<std::is_same_v<policy_t, double> || std::is_same_v<ref_t, double>, double,
                                      float>;

// Row n of a [R, T, V] tensor.
template <typename scalar_t>
struct Rows {
  scalar_t* base;
  int64_t stride_r, stride_t, stride_v, seq_len;

  explicit Rows(const Tensor& x)
      : base(x.data_ptr<scalar_t>()), stride_r(x.stride(0)), stride_t(x.stride(1)), stride_v(x.stride(2)),
        seq_len(x.size(1)) {}

  scalar_t* row(int64_t n) const { return base + (n / seq_len) * stride_r + (n % seq_len) * stride_t; }
};

// Folds one whole row of the policy's logits (and of the reference's, xr non-null) in chunks of kChunk, each read
// once: the online statistics of the row in policy (and ref). z, zr: kChunk scratch entries each.
template <typename policy_t, typename ref_t, typename acc_t>
void fold_row(const policy_t* x, int64_t stride_v, const ref_t* xr, int64_t ref_stride_v, int64_t vocab,
              const TransformParams& t, acc_t* z, acc_t* zr, OnlineLse<acc_t>& policy, OnlineKl<acc_t>& ref) {
  for (int64_t v0 = 0; v0 < vocab; v0 += kChunk) {
    const int64_t len = std::min(kChunk, vocab - v0);
    load_chunk(x + v0 * stride_v, stride_v, len, z);
    transform_chunk(t, z, z, len);
    policy.fold(z, len);
    if (xr != nullptr) {
      load_chunk(xr + v0 * ref_stride_v, ref_stride_v, len, zr);
      transform_chunk(t, zr, zr, len);
      ref.fold(z, zr, len);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> logits_forward(const Tensor& logits, const Tensor& labels,
                                                                  const c10::optional<Tensor>& ref_logits,
                                                                  int64_t ignore_index, double logit_scale,
                                                                  double softcap, double inv_temperature) {
  TORCH_CHECK(logits.dim() == 3, "dpo_kernels::logits_forward: logits must be [R, T, V]");
  const bool with_ref = ref_logits.has_value() && ref_logits->defined();
  const int64_t n = logits.size(0) * logits.size(1), vocab = logits.size(2);
  const at::ScalarType ref_type = with_ref ? ref_logits->scalar_type() : logits.scalar_type();
  const auto opts = logits.options().dtype(stats_type(logits.scalar_type(), ref_type));
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  Tensor ref_logp = with_ref ? at::empty({n}, opts) : at::empty({0}, opts);
  Tensor ref_lse = with_ref ? at::empty({n}, opts) : at::empty({0}, opts);
  Tensor kl = with_ref ? at::empty({n}, opts) : at::empty({0}, opts);
  const Tensor labels_flat = labels.reshape({-1}).to(at::kLong).contiguous();
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dpo_logits_forward", [&] {
   using policy_t = scalar_t;
   AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ref_type, "dpo_logits_forward_ref", [&] {
    using ref_t = scalar_t;
    using acc_t = pair_acc_t<policy_t, ref_t>;
    const Rows<policy_t> rows(logits);
    const Rows<ref_t> ref_rows(with_ref ? *ref_logits : logits);
    const int64_t* y = labels_flat.data_ptr<int64_t>();
    acc_t *out_logp = logp.data_ptr<acc_t>(), *out_lse = lse.data_ptr<acc_t>();
    acc_t* out_ref_logp = with_ref ? ref_logp.data_ptr<acc_t>() : nullptr;
    acc_t* out_ref_lse = with_ref ? ref_lse.data_ptr<acc_t>() : nullptr;
    acc_t* out_kl = with_ref ? kl.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(kChunk), zr(kChunk);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t label = y[i];
        if (label == ignore_index) {  // a masked token reads nothing
          out_logp[i] = out_lse[i] = 0;
          if (with_ref) out_ref_logp[i] = out_ref_lse[i] = out_kl[i] = 0;
          continue;
        }
        const policy_t* x = rows.row(i);
        const ref_t* xr = ref_rows.row(i);
        OnlineLse<acc_t> policy;
        OnlineKl<acc_t> ref;
        fold_row(x, rows.stride_v, with_ref ? xr : nullptr, ref_rows.stride_v, vocab, t, z.data(), zr.data(), policy,
                 ref);
        const acc_t policy_lse = policy.lse();
        const bool in_vocab = label_in_vocab(label, vocab);
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        out_lse[i] = policy_lse;
        out_logp[i] = in_vocab ? t.apply<acc_t>(static_cast<acc_t>(x[label * rows.stride_v])) - policy_lse : nan;
        if (with_ref) {
          const acc_t lse_r = ref.ref.lse();
          out_ref_lse[i] = lse_r;
          out_ref_logp[i] = in_vocab ? t.apply<acc_t>(static_cast<acc_t>(xr[label * ref_rows.stride_v])) - lse_r : nan;
          out_kl[i] = ref.kl(policy_lse);
        }
      }
    });
   });
  });
  return {logp, lse, ref_logp, ref_lse, kl};
}

// The row kernels' named statistics (stats_layout.h) of each row over all its columns, for a vocabulary slice of the
// logits: stats [3, n] (max, sum, label logit) and ref_stats [4, n] (the reference's max, sum, label logit, w), in
// the statistics dtype, folded into what they hold (a fresh buffer: max -inf, the rest 0). A label outside
// [0, vocab) (another rank's column) adds no label logit; a row whose label is ignore_index is not read.
void logits_fold(const Tensor& logits, const Tensor& labels, const Tensor& stats,
                 const c10::optional<Tensor>& ref_logits, const c10::optional<Tensor>& ref_stats, int64_t ignore_index,
                 double logit_scale, double softcap, double inv_temperature) {
  TORCH_CHECK(logits.dim() == 3, "dpo_kernels::logits_fold: logits must be [R, T, V]");
  const bool with_ref = ref_logits.has_value() && ref_logits->defined();
  TORCH_CHECK(stats.size(0) == kStatRows && (!with_ref || ref_stats->size(0) == kRefStatRows),
              "dpo_kernels::logits_fold: stats must be [3, n] and ref_stats [4, n]");
  const int64_t n = logits.size(0) * logits.size(1), vocab = logits.size(2);
  const at::ScalarType ref_type = with_ref ? ref_logits->scalar_type() : logits.scalar_type();
  TORCH_CHECK(stats.scalar_type() == stats_type(logits.scalar_type(), ref_type),
              "dpo_kernels::logits_fold: stats must be in the statistics dtype");
  const Tensor labels_flat = labels.reshape({-1}).to(at::kLong).contiguous();
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dpo_logits_fold", [&] {
   using policy_t = scalar_t;
   AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ref_type, "dpo_logits_fold_ref", [&] {
    using ref_t = scalar_t;
    using acc_t = pair_acc_t<policy_t, ref_t>;
    const Rows<policy_t> rows(logits);
    const Rows<ref_t> ref_rows(with_ref ? *ref_logits : logits);
    const int64_t* y = labels_flat.data_ptr<int64_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    acc_t* rst = with_ref ? ref_stats->data_ptr<acc_t>() : nullptr;
    const int64_t ss = stats.stride(0), rss = with_ref ? ref_stats->stride(0) : 0;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(kChunk), zr(kChunk);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t label = y[i];
        if (label == ignore_index) continue;  // a masked token reads nothing
        const policy_t* x = rows.row(i);
        const ref_t* xr = with_ref ? ref_rows.row(i) : nullptr;
        acc_t* s = st + i;
        acc_t* r = with_ref ? rst + i : nullptr;
        OnlineLse<acc_t> policy{s[kMax * ss], s[kSum * ss]};
        OnlineKl<acc_t> ref;
        if (with_ref) ref = {OnlineLse<acc_t>{r[kRefMax * rss], r[kRefSum * rss]}, r[kRefWeighted * rss]};
        fold_row(x, rows.stride_v, xr, ref_rows.stride_v, vocab, t, z.data(), zr.data(), policy, ref);
        s[kMax * ss] = policy.m;
        s[kSum * ss] = policy.s;
        const bool held = label_in_vocab(label, vocab);
        if (held) s[kLabelLogit * ss] = t.apply<acc_t>(static_cast<acc_t>(x[label * rows.stride_v]));
        if (with_ref) {
          r[kRefMax * rss] = ref.ref.m;
          r[kRefSum * rss] = ref.ref.s;
          r[kRefWeighted * rss] = ref.w;
          if (held) r[kRefLabelLogit * rss] = t.apply<acc_t>(static_cast<acc_t>(xr[label * ref_rows.stride_v]));
        }
      }
    });
   });
  });
}

void logits_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& g,
                     const c10::optional<Tensor>& ref_logits, const c10::optional<Tensor>& ref_lse,
                     const c10::optional<Tensor>& g_kl, const Tensor& grad, int64_t ignore_index, double logit_scale,
                     double softcap, double inv_temperature) {
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "dpo_kernels::logits_backward: grad must match logits");
  const bool with_kl = g_kl.has_value() && g_kl->defined();
  const int64_t n = logits.size(0) * logits.size(1), vocab = logits.size(2);
  const Tensor labels_flat = labels.reshape({-1}).to(at::kLong).contiguous();
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);
  const at::ScalarType ref_type = with_kl ? ref_logits->scalar_type() : logits.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dpo_logits_backward", [&] {
   using policy_t = scalar_t;
   AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ref_type, "dpo_logits_backward_ref", [&] {
    using ref_t = scalar_t;
    // the forward's statistics dtype: fp64 when the policy's or the reference's logits were fp64
    AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "dpo_logits_backward_acc", [&] {
    using acc_t = scalar_t;
    const Rows<policy_t> rows(logits), grad_rows(grad);
    const Rows<ref_t> ref_rows(with_kl ? *ref_logits : logits);
    const int64_t* y = labels_flat.data_ptr<int64_t>();
    const acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t* g_p = g.data_ptr<acc_t>();
    const acc_t* ref_lse_p = with_kl ? ref_lse->data_ptr<acc_t>() : nullptr;
    const acc_t* g_kl_p = with_kl ? g_kl->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(kChunk), z(kChunk), zr(kChunk), dz(kChunk);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t label = y[i];
        const bool valid = label != ignore_index;
        const policy_t* xrow = rows.row(i);
        policy_t* grow = grad_rows.row(i);
        for (int64_t v0 = 0; v0 < vocab; v0 += kChunk) {
          const int64_t len = std::min(kChunk, vocab - v0);
          if (valid) {
            load_chunk(xrow + v0 * rows.stride_v, rows.stride_v, len, x.data());
            transform_chunk(t, x.data(), z.data(), len);
            if (with_kl) {
              load_chunk(ref_rows.row(i) + v0 * ref_rows.stride_v, ref_rows.stride_v, len, zr.data());
              transform_chunk(t, zr.data(), zr.data(), len);
            }
            const int64_t col = (label >= v0 && label < v0 + len) ? label - v0 : -1;
            chunk_grad(z.data(), zr.data(), len, lse_p[i], with_kl ? ref_lse_p[i] : acc_t(0), g_p[i],
                       with_kl ? g_kl_p[i] : acc_t(0), with_kl, col, dz.data());
            transform_grad_chunk(t, x.data(), dz.data(), dz.data(), len);
          } else {
            std::fill(dz.begin(), dz.begin() + len, acc_t(0));
          }
          // written after the chunk was read, so grad may be the logits themselves (inplace_backward)
          policy_t* out = grow + v0 * grad_rows.stride_v;
          for (int64_t k = 0; k < len; ++k) out[k * grad_rows.stride_v] = static_cast<policy_t>(dz[k]);
        }
      }
    });
    });
   });
  });
}

// A row of a linear-path tile: z = transform(x + bias). Returns the raw logits x + bias: x itself without a bias,
// else `buffer`.
template <typename acc_t>
inline const acc_t* biased_row(const TransformParams& t, const acc_t* x, const acc_t* bias, int64_t width,
                               acc_t* buffer, acc_t* z) {
  const acc_t* raw = x;
  if (bias != nullptr) {
    for (int64_t k = 0; k < width; ++k) buffer[k] = x[k] + bias[k];
    raw = buffer;
  }
  transform_chunk(t, raw, z, width);
  return raw;
}

// The logging rows of one token (its statistics column st, row stride ss; stats_layout.h): sum e^{z - m} z and
// sum e^{2 (z - m)} rescaled from the previous max, sum z, and the largest z left of the label's column `col`.
template <typename acc_t>
void fold_logging(const acc_t* z, int64_t width, acc_t m, acc_t rescale, int64_t col, acc_t* st, int64_t ss) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(shift_of(m)), zero(0);
  const auto add = [](Vec a, Vec b) { return a + b; };
  // a -inf logit's e^{z - m} z is 0 (the limit), not 0 * -inf
  const acc_t weighted = at::vec::map_reduce_all<acc_t>(
      [vm, zero](Vec x) {
        const Vec e = vexp(x - vm);
        return Vec::blendv(zero, e * x, e > zero);
      },
      add, z, width);
  const acc_t squares = at::vec::map_reduce_all<acc_t>(
      [vm](Vec x) {
        const Vec e = vexp(x - vm);
        return e * e;
      },
      add, z, width);
  const acc_t total = at::vec::reduce_all<acc_t>(add, z, width);
  const int64_t left = std::min(std::max<int64_t>(col, 0), width);
  const acc_t before = left > 0 ? chunk_max(z, left) : -std::numeric_limits<acc_t>::infinity();
  st[kWeightedLogits * ss] = st[kWeightedLogits * ss] * rescale + weighted;
  st[kSquares * ss] = st[kSquares * ss] * rescale * rescale + squares;
  st[kLogitSum * ss] += total;
  st[kMaxBeforeLabel * ss] = std::max(st[kMaxBeforeLabel * ss], before);
}

template <typename acc_t>
const acc_t* optional_data(const c10::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<acc_t>() : nullptr;
}

// A running sum kept at a shift (fold_shifted; dpo_kernels/ops/linear/contract.py's Accumulator): the shift [n]
// (contiguous), the sums [n, D] (rows contiguous) or none, and where the new shift goes ([n], contiguous; may be
// `shift`).
struct Shifted {
  c10::optional<Tensor> values;
  Tensor shift;
  Tensor shift_out;
};

// Linear path, one tile: fold raw logits x [n, w] (columns v0..v0+w) into per-token statistics.
// stats [3, n]: running max, running sum, label logit. ref_stats [4, n]: the reference's max, sum, label logit
// and the KL's weighted sum w. With weights [n, w] (contiguous; x's dtype, and then may be x itself: each row is read
// before it is written; or a narrower float dtype, rounded once), also the softmax weights e^{z - m'} t'(x) after the
// fold (m' the new running max), and with ref_weights the reference's e^{zr - m_r'} t'(x) (the policy's slope).
// With `acc` (fold_shifted), the weights are taken at each row's shift instead: s' = s unless m' > s + headroom,
// then s' = m'; a row whose shift moved from a finite s has its sums scaled by e^{s - s'}; s' is written back
// (and the same for the reference with ref_acc, at its own max).
void fold_tile_into(const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0, const Tensor& labels,
                    const Tensor& stats, bool logging, const c10::optional<Tensor>& xr,
                    const c10::optional<Tensor>& ref_bias, const c10::optional<Tensor>& ref_stats, double logit_scale,
                    double softcap, double inv_temperature, const c10::optional<Tensor>& weights,
                    const c10::optional<Tensor>& ref_weights, const Shifted* acc = nullptr,
                    const Shifted* ref_acc = nullptr, double headroom = 0) {
  const bool with_ref = xr.has_value() && xr->defined();
  // with logging, the statistics trainers only log follow the three of the contract (stats_layout.h)
  TORCH_CHECK(stats.size(0) == stat_rows(logging), "dpo_kernels::fold_tile: stats must have ", stat_rows(logging),
              " rows with logging=", logging, ", got ", stats.size(0));
  const int64_t rows = x.size(0), width = x.size(1);
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dpo_fold_tile", [&] {
    using acc_t = scalar_t;
    using Vec = Vectorized<acc_t>;
    const acc_t* xp = x.data_ptr<acc_t>();
    const acc_t* xrp = with_ref ? xr->data_ptr<acc_t>() : nullptr;
    const acc_t* bp = optional_data<acc_t>(bias);
    const acc_t* rbp = optional_data<acc_t>(ref_bias);
    const bool with_weights = weights.has_value() && weights->defined();
    const bool with_ref_weights = ref_weights.has_value() && ref_weights->defined();
    // weights in x's dtype are written in place; a narrower dtype goes through a row buffer, rounded once
    const bool narrow = with_weights && weights->scalar_type() != x.scalar_type();
    acc_t* wp = with_weights && !narrow ? weights->data_ptr<acc_t>() : nullptr;
    acc_t* rwp = with_ref_weights && !narrow ? ref_weights->data_ptr<acc_t>() : nullptr;
    const int64_t* y = labels.data_ptr<int64_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    acc_t* rst = with_ref ? ref_stats->data_ptr<acc_t>() : nullptr;
    const int64_t ss = stats.stride(0), rss = with_ref ? ref_stats->stride(0) : 0;
    // e^{zz - shift} t'(raw) of row i into `into` (weights or ref_weights): the softmax weights of one row
    // the shift of row i's weights, moved as the contract says; its sums rescaled where it moved from a finite one
    auto move_shift = [&](const Shifted* a, acc_t m, int64_t i) -> acc_t {
      const acc_t old = a->shift.data_ptr<acc_t>()[i], lowest = std::numeric_limits<acc_t>::lowest();
      const acc_t now = (m > old + static_cast<acc_t>(headroom) && m > lowest) ? m : old;
      if (a->values.has_value() && a->values->defined() && now != old &&
          old > -std::numeric_limits<acc_t>::infinity()) {
        acc_t* sums = a->values->data_ptr<acc_t>() + i * a->values->stride(0);
        const acc_t factor = std::exp(old - now);
        for (int64_t k = 0; k < a->values->size(1); ++k) sums[k] *= factor;
      }
      a->shift_out.data_ptr<acc_t>()[i] = now;
      return shift_of(now);
    };
    auto write_weights = [&](const acc_t* zz, acc_t shift, const acc_t* raw, const Tensor& into, acc_t* direct,
                             int64_t i, acc_t* row) {
      acc_t* out = direct != nullptr ? direct + i * width : row;
      const Vec vs(shift);
      at::vec::map([vs](Vec v) { return vexp(v - vs); }, out, zz, width);
      transform_grad_chunk(t, raw, out, out, width);
      if (direct == nullptr) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, into.scalar_type(), "dpo_fold_weights_out", [&] {
          scalar_t* dst = into.data_ptr<scalar_t>() + i * width;
          for (int64_t k = 0; k < width; ++k) dst[k] = static_cast<scalar_t>(out[k]);
        });
      }
    };
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> raw(width), rraw(width), z(width), zr(width), row(narrow ? width : 0);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* xraw = biased_row(t, xp + i * x.stride(0), bp, width, raw.data(), z.data());
        if (with_weights && xraw != raw.data()) {  // the weights may overwrite the tile's row: keep its raw logits
          std::copy(xraw, xraw + width, raw.data());
        }
        acc_t* s = st + i;  // row r of token i's statistics at s[r * ss]
        OnlineLse<acc_t> policy{s[kMax * ss], s[kSum * ss]};
        const acc_t rescale = policy.fold(z.data(), width);
        s[kMax * ss] = policy.m;
        s[kSum * ss] = policy.s;
        const int64_t col = y[i] - v0;
        const bool hit = col >= 0 && col < width;
        if (hit) s[kLabelLogit * ss] = z[col];
        if (logging) fold_logging(z.data(), width, policy.m, rescale, col, s, ss);
        if (with_ref) {
          biased_row(t, xrp + i * xr->stride(0), rbp, width, rraw.data(), zr.data());
          acc_t* r = rst + i;
          OnlineKl<acc_t> ref{OnlineLse<acc_t>{r[kRefMax * rss], r[kRefSum * rss]}, r[kRefWeighted * rss]};
          ref.fold(z.data(), zr.data(), width);
          r[kRefMax * rss] = ref.ref.m;
          r[kRefSum * rss] = ref.ref.s;
          r[kRefWeighted * rss] = ref.w;
          if (hit) r[kRefLabelLogit * rss] = zr[col];
          if (with_ref_weights) {
            const acc_t at = ref_acc != nullptr ? move_shift(ref_acc, ref.ref.m, i) : shift_of(ref.ref.m);
            write_weights(zr.data(), at, raw.data(), *ref_weights, rwp, i, row.data());
          }
        }
        if (with_weights) {
          const acc_t at = acc != nullptr ? move_shift(acc, policy.m, i) : shift_of(policy.m);
          write_weights(z.data(), at, raw.data(), *weights, wp, i, row.data());
        }
      }
    });
  });
}

void fold_tile(const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0, const Tensor& labels,
               const Tensor& stats, bool logging, const c10::optional<Tensor>& xr,
               const c10::optional<Tensor>& ref_bias, const c10::optional<Tensor>& ref_stats, double logit_scale,
               double softcap, double inv_temperature) {
  fold_tile_into(x, bias, v0, labels, stats, logging, xr, ref_bias, ref_stats, logit_scale, softcap, inv_temperature,
                 c10::nullopt, c10::nullopt);
}

// fold_tile_into with weights (fold_tile_weights, and fold_tile_shifted's with its shifts), after checking them for
// the op `what`; the logging rows, when the statistics were allocated with them (stats_layout.h), are folded as
// fold_tile's.
void fold_with_weights(const char* what, const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0,
                       const Tensor& labels, const Tensor& stats, const c10::optional<Tensor>& xr,
                       const c10::optional<Tensor>& ref_bias, const c10::optional<Tensor>& ref_stats,
                       double logit_scale, double softcap, double inv_temperature, const Tensor& weights,
                       const c10::optional<Tensor>& ref_weights, const Shifted* acc = nullptr,
                       const Shifted* ref_acc = nullptr, double headroom = 0) {
  const bool with_ref_weights = ref_weights.has_value() && ref_weights->defined();
  TORCH_CHECK(weights.is_contiguous() && weights.sizes() == x.sizes() && at::isFloatingType(weights.scalar_type()) &&
                  (!with_ref_weights || (ref_weights->is_contiguous() && ref_weights->sizes() == x.sizes() &&
                                         ref_weights->scalar_type() == weights.scalar_type())),
              "dpo_kernels::", what, ": weights (and ref_weights) must be contiguous float tiles of x's shape, of one "
              "dtype");
  const bool logging = stats.size(0) == stat_rows(true);
  fold_tile_into(x, bias, v0, labels, stats, logging, xr, ref_bias, ref_stats, logit_scale, softcap, inv_temperature,
                 weights, ref_weights, acc, ref_acc, headroom);
}

void fold_tile_weights(const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0, const Tensor& labels,
                       const Tensor& stats, const c10::optional<Tensor>& xr, const c10::optional<Tensor>& ref_bias,
                       const c10::optional<Tensor>& ref_stats, const Tensor& weights,
                       const c10::optional<Tensor>& ref_weights, double logit_scale, double softcap,
                       double inv_temperature) {
  fold_with_weights("fold_tile_weights", x, bias, v0, labels, stats, xr, ref_bias, ref_stats, logit_scale, softcap,
                    inv_temperature, weights, ref_weights);
}

// fold_tile_weights at the shifts of a frozen head's sums or a scaled store (the schema's doc in bindings.cpp).
void fold_tile_shifted(const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0, const Tensor& labels,
                       const Tensor& stats, const c10::optional<Tensor>& xr, const c10::optional<Tensor>& ref_bias,
                       const c10::optional<Tensor>& ref_stats, const Tensor& weights,
                       const c10::optional<Tensor>& ref_weights, const c10::optional<Tensor>& acc, const Tensor& shift,
                       const c10::optional<Tensor>& ref_acc, const c10::optional<Tensor>& ref_shift,
                       const c10::optional<Tensor>& shift_out, const c10::optional<Tensor>& ref_shift_out,
                       double headroom, double logit_scale, double softcap, double inv_temperature) {
  const bool with_ref_weights = ref_weights.has_value() && ref_weights->defined();
  auto out_or = [](const c10::optional<Tensor>& out, const Tensor& in) {
    return out.has_value() && out->defined() ? *out : in;
  };
  const bool sums = acc.has_value() && acc->defined();
  const int64_t n = x.size(0);
  auto shift_ok = [&](const Tensor& s) {
    return s.dim() == 1 && s.size(0) == n && s.is_contiguous() && s.scalar_type() == stats.scalar_type();
  };
  auto sums_ok = [&](const c10::optional<Tensor>& a) {
    return !sums || (a.has_value() && a->defined() && a->dim() == 2 && a->size(0) == n && a->stride(1) == 1 &&
                     a->scalar_type() == stats.scalar_type());
  };
  TORCH_CHECK(shift_ok(shift) && shift_ok(out_or(shift_out, shift)) && sums_ok(acc) &&
                  (!with_ref_weights || (ref_shift.has_value() && shift_ok(*ref_shift) &&
                                         shift_ok(out_or(ref_shift_out, *ref_shift)) && sums_ok(ref_acc))),
              "dpo_kernels::fold_tile_shifted: each shift must be a contiguous [n] tensor and each set of sums "
              "[n, D] with contiguous rows, in the statistics' dtype (the reference's with its weights)");
  const Shifted policy{acc, shift, out_or(shift_out, shift)};
  const Tensor& ref_in = with_ref_weights ? *ref_shift : shift;
  const Shifted reference{ref_acc, ref_in, out_or(ref_shift_out, ref_in)};
  fold_with_weights("fold_tile_shifted", x, bias, v0, labels, stats, xr, ref_bias, ref_stats, logit_scale, softcap,
                    inv_temperature, weights, ref_weights, &policy, with_ref_weights ? &reference : nullptr,
                    headroom);
}

// Linear path, one tile kept as its softmax weights a [n, w] (fp16, contiguous; dpo_kernels/ops/linear/contract.py's
// ScaledTile): out [n, w] (rows contiguous, any row stride, any float dtype) = -(g - g_kl) e^{m - lse} a
// - g_kl e^{m_r - lse_r} a_r, and at the label's column t'(z_y) (g (1 - p_y) + g_kl (p_y - q_y)).
void scaled_grad_tile(const Tensor& weights, const Tensor& maxes, const Tensor& label_logits, int64_t v0,
                      const Tensor& labels, const Tensor& lse, const Tensor& g, const c10::optional<Tensor>& ref_weights,
                      const c10::optional<Tensor>& ref_maxes, const c10::optional<Tensor>& ref_label_logits,
                      const c10::optional<Tensor>& ref_lse, const c10::optional<Tensor>& g_kl, const Tensor& out,
                      double logit_scale, double softcap, double inv_temperature) {
  const bool with_ref = ref_weights.has_value() && ref_weights->defined();
  TORCH_CHECK(weights.dim() == 2 && weights.is_contiguous() && out.sizes() == weights.sizes() && out.stride(1) == 1 &&
                  (!with_ref || (ref_weights->sizes() == weights.sizes() && ref_weights->is_contiguous() &&
                                 ref_weights->scalar_type() == weights.scalar_type() && ref_maxes.has_value() &&
                                 ref_label_logits.has_value() && ref_lse.has_value() && g_kl.has_value())),
              "dpo_kernels::scaled_grad_tile: weights (and ref_weights, with every reference argument) must be "
              "contiguous [n, w] tiles of one dtype, out [n, w] with contiguous rows");
  const int64_t rows = weights.size(0), width = weights.size(1);
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "dpo_scaled_grad_tile", [&] {
    using acc_t = scalar_t;
    const Tensor m_c = maxes.contiguous(), zy_c = label_logits.contiguous(), lse_c = lse.contiguous(),
                 g_c = g.contiguous();
    const Tensor mr_c = with_ref ? ref_maxes->contiguous() : m_c, zry_c = with_ref ? ref_label_logits->contiguous() : zy_c,
                 rlse_c = with_ref ? ref_lse->contiguous() : lse_c, gkl_c = with_ref ? g_kl->contiguous() : g_c;
    const acc_t *m = m_c.data_ptr<acc_t>(), *zy = zy_c.data_ptr<acc_t>(), *lse_p = lse_c.data_ptr<acc_t>(),
                *g_p = g_c.data_ptr<acc_t>(), *mr = mr_c.data_ptr<acc_t>(), *zry = zry_c.data_ptr<acc_t>(),
                *rlse = rlse_c.data_ptr<acc_t>(), *gkl = gkl_c.data_ptr<acc_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "dpo_scaled_grad_in", [&] {
      using w_t = scalar_t;
      const w_t* a = weights.data_ptr<w_t>();
      const w_t* ar = with_ref ? ref_weights->data_ptr<w_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dpo_scaled_grad_out", [&] {
        using out_t = scalar_t;
        out_t* op = out.data_ptr<out_t>();
        at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const acc_t g_kl_i = with_ref ? gkl[i] : acc_t(0);
            const acc_t scale = -(g_p[i] - g_kl_i) * std::exp(shift_of(m[i]) - lse_p[i]);
            const acc_t ref_scale = with_ref ? -g_kl_i * std::exp(shift_of(mr[i]) - rlse[i]) : acc_t(0);
            const w_t* ai = a + i * width;
            out_t* oi = op + i * out.stride(0);
            for (int64_t k = 0; k < width; ++k) {
              acc_t dz = scale * static_cast<acc_t>(ai[k]);
              if (with_ref) dz += ref_scale * static_cast<acc_t>(ar[i * width + k]);
              oi[k] = static_cast<out_t>(dz);
            }
            const int64_t col = y[i] - v0;
            if (col >= 0 && col < width) {
              const acc_t p_y = std::exp(zy[i] - lse_p[i]);
              acc_t value = g_p[i] * (acc_t(1) - p_y);
              if (with_ref) value += g_kl_i * (p_y - std::exp(zry[i] - rlse[i]));
              oi[col] = static_cast<out_t>(value * t.slope_at(zy[i]));
            }
          }
        });
      });
    });
  });
}

// Linear path, one tile: write dL/dx of raw logits x [n, w] into out [n, w] (any float dtype; may be x itself:
// each row is read into thread-local buffers before it is written). Returns 0 when filter_eps >= 0 and every
// |p - onehot| (and |p - q|) of the tile is below it (the caller then skips the tile), else 1.
int64_t grad_tile(const Tensor& x, const c10::optional<Tensor>& bias, int64_t v0, const Tensor& labels,
                  const Tensor& lse, const Tensor& g, const c10::optional<Tensor>& xr,
                  const c10::optional<Tensor>& ref_bias, const c10::optional<Tensor>& ref_lse,
                  const c10::optional<Tensor>& g_kl, const Tensor& out, double filter_eps, double logit_scale,
                  double softcap, double inv_temperature) {
  TORCH_CHECK(out.sizes() == x.sizes() && out.stride(1) == 1, "dpo_kernels::grad_tile: out must be [n, w], rows "
              "contiguous");
  const bool with_kl = g_kl.has_value() && g_kl->defined();
  const bool filter = filter_eps >= 0;
  const int64_t rows = x.size(0), width = x.size(1);
  const TransformParams t = make_transform(logit_scale, softcap, inv_temperature);
  double deviation = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dpo_grad_tile", [&] {
    using acc_t = scalar_t;
    const acc_t* xp = x.data_ptr<acc_t>();
    const acc_t* xrp = with_kl ? xr->data_ptr<acc_t>() : nullptr;
    const acc_t* bp = optional_data<acc_t>(bias);
    const acc_t* rbp = optional_data<acc_t>(ref_bias);
    const int64_t* y = labels.data_ptr<int64_t>();
    const acc_t *lse_p = lse.data_ptr<acc_t>(), *g_p = g.data_ptr<acc_t>();
    const acc_t* ref_lse_p = with_kl ? ref_lse->data_ptr<acc_t>() : nullptr;
    const acc_t* g_kl_p = with_kl ? g_kl->data_ptr<acc_t>() : nullptr;
    const int64_t threads = at::get_num_threads();
    std::vector<acc_t> worst(threads, acc_t(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dpo_grad_tile_out", [&] {
      using out_t = scalar_t;
      out_t* op = out.data_ptr<out_t>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> raw(width), z(width), rraw(width), zr(width), dz(width);
        acc_t& dev = worst[at::get_thread_num()];
        for (int64_t i = begin; i < end; ++i) {
          const acc_t* xi = biased_row(t, xp + i * x.stride(0), bp, width, raw.data(), z.data());
          if (with_kl) biased_row(t, xrp + i * xr->stride(0), rbp, width, rraw.data(), zr.data());
          const int64_t col = (y[i] >= v0 && y[i] < v0 + width) ? y[i] - v0 : -1;
          const acc_t ref_lse_i = with_kl ? ref_lse_p[i] : acc_t(0);
          if (filter) {
            dev = std::max(dev, chunk_deviation(z.data(), zr.data(), width, lse_p[i], ref_lse_i, with_kl, col));
          }
          chunk_grad(z.data(), zr.data(), width, lse_p[i], ref_lse_i, g_p[i], with_kl ? g_kl_p[i] : acc_t(0),
                     with_kl, col, dz.data());
          transform_grad_chunk(t, xi, dz.data(), dz.data(), width);
          out_t* orow = op + i * out.stride(0);
          for (int64_t k = 0; k < width; ++k) orow[k] = static_cast<out_t>(dz[k]);
        }
      });
    });
    for (acc_t d : worst) deviation = std::max(deviation, static_cast<double>(d));
  });
  return (filter && deviation < filter_eps) ? 0 : 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("logits_forward", &logits_forward);
  m.impl("logits_fold", &logits_fold);
  m.impl("logits_backward", &logits_backward);
  m.impl("fold_tile", &fold_tile);
  m.impl("fold_tile_weights", &fold_tile_weights);
  m.impl("fold_tile_shifted", &fold_tile_shifted);
  m.impl("scaled_grad_tile", &scaled_grad_tile);
  m.impl("grad_tile", &grad_tile);
}

}  // namespace cpu
}  // namespace dpo_kernels
