// The rows of the linear path's per-token statistics, for the C++ and CUDA tile kernels: the same layout as
// STATS_ROWS, LOGGING_ROWS and REF_STATS_ROWS in dpo_kernels/ops/linear/contract.py (StatRow, RefRow there), which
// allocates the buffers. A statistics buffer is [rows, n] with a row stride; row r of token i is at r * stride + i.
#pragma once

namespace dpo_kernels {

// The policy's rows: three always, four more when the statistics trainers only log are asked for.
enum StatRow : int {
  kMax = 0,             // running max m
  kSum = 1,             // running sum of exp(z - m)
  kLabelLogit = 2,      // the label's logit, where the label falls in the tile
  kWeightedLogits = 3,  // sum exp(z - m) z            (logging)
  kSquares = 4,         // sum exp(2 (z - m))          (logging)
  kLogitSum = 5,        // sum z                       (logging)
  kMaxBeforeLabel = 6,  // largest z left of the label (logging)
};
constexpr int kStatRows = 3;
constexpr int kStatRowsWithLogging = 7;
// The policy's row count for a fold asked (logging) or not for the logged statistics: the flag is explicit at every
// kernel boundary and the buffer's row count is checked against it.
constexpr int stat_rows(bool logging) { return logging ? kStatRowsWithLogging : kStatRows; }

// The reference's rows: its own max, sum and label logit, and the KL's w = sum exp(zr - m_r) (zr - z).
enum RefRow : int { kRefMax = 0, kRefSum = 1, kRefLabelLogit = 2, kRefWeighted = 3 };
constexpr int kRefStatRows = 4;

}  // namespace dpo_kernels
