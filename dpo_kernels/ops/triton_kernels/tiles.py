"""Triton tile kernels of the linear path: the ``fold`` and ``grad`` kernels of :mod:`dpo_kernels.ops.linear.contract`.

The tile loop (:mod:`dpo_kernels.ops.linear.loop`) writes each tile's raw logits with one cuBLAS GEMM (half
operands on the tensor cores, fp32 output); these kernels are the memory-bound part around it.

- ``_fold_tile_kernel``: one program per token walks its row of the fp32 tile in ``BLOCK_V`` steps (one exp per
  logit, one more per reference logit), then merges into the running statistics ``[3, n]`` (``[4, n]`` for the
  reference: max, sum, label logit, and ``w = sum_v e^{zr_v - mr} (zr_v - z_v)``; on request also the rows
  trainers only log). Reads the tile once (4 bytes per logit, 8 with a reference), writes ``O(n)``. The same kernel
  is ``fold_weights`` (then a second pass over each row writing its softmax weights at the new maxima) and
  ``fold_shifted`` (the weights written in the one pass at each token's shift, which moves only when the max
  outgrows it: a second pass only for such a row, and only then its accumulator row rescaled).
- ``_scaled_grad_kernel``: the same grid over a tile kept as fp16 softmax weights (the eager schedule's scaled
  store): ``dZ`` from the weights, each row's shift and the exact label logit, 2 bytes read per logit (4 with the
  reference), one launch a tile.
- ``_grad_tile_kernel``: a ``(token, column block)`` grid writes ``dL/dx = transform'(x) (g (onehot - p) +
  g_kl (p - q))`` into ``out`` in the GEMM operand dtype (bf16: 2 bytes per logit), reading 4 (8 with the KL). With
  the gradient filter it also takes the tile's largest ``|p - onehot|`` (and ``|p - q|``) with one atomic max per
  program, on a single float.

Both are memory bound; what that traffic costs next to the GEMMs at the Llama-3 head is the design target computed
in :mod:`dpo_kernels.ops.linear.loop`'s docstring (from peak rates, not measured). Absent buffers are ``None`` and
their constexpr flags are derived by ``triton.heuristics``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...options import TokenOptions
from ..linear.contract import Accumulator, LogitsTile, RefRow, ScaledTile, StatRow, has_logging_rows
from .config import tile_row_config
from .jit_helpers import LOWEST, fold_reference_block, load_biased, transform, transform_and_slope
from .launch import on_device, transform_args


# the statistics layout of contract.StatRow / RefRow, as constants the kernels can read
_MAX, _SUM, _LABEL_LOGIT = tl.constexpr(StatRow.MAX.value), tl.constexpr(StatRow.SUM.value), tl.constexpr(
    StatRow.LABEL_LOGIT.value)
_WEIGHTED_LOGITS, _SQUARES = tl.constexpr(StatRow.WEIGHTED_LOGITS.value), tl.constexpr(StatRow.SQUARES.value)
_LOGIT_SUM, _MAX_BEFORE_LABEL = tl.constexpr(StatRow.LOGIT_SUM.value), tl.constexpr(StatRow.MAX_BEFORE_LABEL.value)
_REF_MAX, _REF_SUM = tl.constexpr(RefRow.MAX.value), tl.constexpr(RefRow.SUM.value)
_REF_LABEL_LOGIT, _REF_WEIGHTED = tl.constexpr(RefRow.LABEL_LOGIT.value), tl.constexpr(RefRow.WEIGHTED.value)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_REF": lambda a: a["xr_ptr"] is not None,
    "HAS_REF_BIAS": lambda a: a["ref_bias_ptr"] is not None,
    "WEIGHTS": lambda a: a["weights_ptr"] is not None,
    "REF_WEIGHTS": lambda a: a["ref_weights_ptr"] is not None,
    "SHIFTED": lambda a: a["shift_ptr"] is not None,
    "SUMS": lambda a: a["acc_ptr"] is not None,
})
@triton.jit
def _fold_tile_kernel(
    x_ptr, bias_ptr, xr_ptr, ref_bias_ptr, labels_ptr, stats_ptr, stats_stride, ref_stats_ptr, ref_stats_stride,
    weights_ptr, ref_weights_ptr, acc_ptr, shift_ptr, ref_acc_ptr, ref_shift_ptr, shift_out_ptr, ref_shift_out_ptr,
    acc_stride, dim, headroom,
    width, v0, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, LOGGING: tl.constexpr,
    WEIGHTS: tl.constexpr, REF_WEIGHTS: tl.constexpr, SHIFTED: tl.constexpr, SUMS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * width
    label_col = tl.load(labels_ptr + row) - v0
    if SHIFTED:  # fold_shifted: the weights at the accumulators' shifts, written in this one pass
        hit = (label_col >= 0) & (label_col < width)
        # the label logits first (read after the row loop, they cost a Triton 3.6 build a spill inside a loop)
        _store_label_logit(hit, x_row, bias_ptr, label_col, stats_ptr + row + _LABEL_LOGIT * stats_stride,
                           logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        if HAS_REF:
            _store_label_logit(hit, xr_ptr + row * width, ref_bias_ptr, label_col,
                               ref_stats_ptr + row + _REF_LABEL_LOGIT * ref_stats_stride, logit_scale, softcap,
                               inv_temperature, HAS_REF_BIAS, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        shift = tl.load(shift_ptr + row)  # the shift before the tile (shift_out_ptr may be the same slot)
        ref_shift = 0.0
        if REF_WEIGHTS:
            ref_shift = tl.load(ref_shift_ptr + row)
        stale = shift != shift  # False (a shift is never NaN)
    # the running maxima are scalars (one cross-warp reduction per block); every sum is kept per lane and reduced once
    m = LOWEST
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    weighted = tl.zeros((BLOCK_V,), dtype=tl.float32)  # LOGGING: sum e^{z - m} z, sum e^{2 (z - m)}, sum z,
    squares = tl.zeros((BLOCK_V,), dtype=tl.float32)  # and the max z left of the label
    logit_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    before = tl.full((BLOCK_V,), -float("inf"), dtype=tl.float32)
    m_r = LOWEST
    s_r = tl.zeros((BLOCK_V,), dtype=tl.float32)
    w = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < width
        x = load_biased(x_row, bias_ptr, cols, inside, HAS_BIAS)
        if SHIFTED:
            z, slope = transform_and_slope(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP,
                                           HAS_TEMPERATURE)
        else:
            z = transform(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        z_masked = tl.where(inside, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z_masked, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z_masked - m_new)
        s = s * rescale + e
        m = m_new
        if LOGGING:
            z_inside = tl.where(inside, z, 0.0)
            weighted = weighted * rescale + tl.where(e > 0, e * z_inside, 0.0)  # a -inf logit's e z is 0
            squares = squares * rescale * rescale + e * e
            logit_sum += z_inside
            before = tl.maximum(before, tl.where(inside & (cols < label_col), z, -float("inf")))
        if HAS_REF:
            xr = load_biased(xr_ptr + row * width, ref_bias_ptr, cols, inside, HAS_REF_BIAS)
            zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
            m_r, s_r, w = fold_reference_block(z, zr, inside, m_r, s_r, w)
        if SHIFTED:
            # a shift moves only when the max outgrows it by the headroom (rare after a row's first block); blocks
            # already written at a finite shift are then stale, and the row is written again after the loop
            move = (m > shift + headroom) & (m > LOWEST)
            stale = stale | (move & (shift > float("-inf")))
            shift = tl.where(move, m, shift)
            if REF_WEIGHTS:
                ref_move = (m_r > ref_shift + headroom) & (m_r > LOWEST)
                stale = stale | (ref_move & (ref_shift > float("-inf")))
                ref_shift = tl.where(ref_move, m_r, ref_shift)
            # a shift still -inf means every logit so far was -inf: shifted by 0, their weights are 0
            at = tl.where(shift == float("-inf"), 0.0, shift)
            tl.store(weights_ptr + row * width + cols, tl.exp(z - at) * slope, mask=inside)
            if REF_WEIGHTS:
                ref_at = tl.where(ref_shift == float("-inf"), 0.0, ref_shift)
                tl.store(ref_weights_ptr + row * width + cols, tl.exp(zr - ref_at) * slope, mask=inside)
    s = tl.sum(s, axis=0)
    s_r = tl.sum(s_r, axis=0)
    w = tl.sum(w, axis=0)
    if LOGGING:
        weighted = tl.sum(weighted, axis=0)
        squares = tl.sum(squares, axis=0)
        logit_sum = tl.sum(logit_sum, axis=0)
        before = tl.max(before, axis=0)

    st = stats_ptr + row  # row r of this token's statistics at st + r * stats_stride (contract.StatRow)
    old_m = tl.load(st + _MAX * stats_stride)
    old_s = tl.load(st + _SUM * stats_stride)
    big = tl.maximum(old_m, m)
    f_old, f_new = tl.exp(old_m - big), tl.exp(m - big)  # m >= LOWEST: big is finite or NaN, never -inf
    tl.store(st + _MAX * stats_stride, big)
    tl.store(st + _SUM * stats_stride, old_s * f_old + s * f_new)
    if LOGGING:
        weighted_row = st + _WEIGHTED_LOGITS * stats_stride
        tl.store(weighted_row, tl.load(weighted_row) * f_old + weighted * f_new)
        squares_row = st + _SQUARES * stats_stride
        tl.store(squares_row, tl.load(squares_row) * f_old * f_old + squares * f_new * f_new)
        sum_row = st + _LOGIT_SUM * stats_stride
        tl.store(sum_row, tl.load(sum_row) + logit_sum)
        before_row = st + _MAX_BEFORE_LABEL * stats_stride
        tl.store(before_row, tl.maximum(tl.load(before_row), before))
    if not SHIFTED:
        hit = (label_col >= 0) & (label_col < width)
        _store_label_logit(hit, x_row, bias_ptr, label_col, st + _LABEL_LOGIT * stats_stride, logit_scale, softcap,
                           inv_temperature, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
    if HAS_REF:
        rst = ref_stats_ptr + row  # contract.RefRow
        old_m_r = tl.load(rst + _REF_MAX * ref_stats_stride)
        old_s_r = tl.load(rst + _REF_SUM * ref_stats_stride)
        old_w = tl.load(rst + _REF_WEIGHTED * ref_stats_stride)
        big_r = tl.maximum(old_m_r, m_r)
        f_old, f_new = tl.exp(old_m_r - big_r), tl.exp(m_r - big_r)
        tl.store(rst + _REF_MAX * ref_stats_stride, big_r)
        tl.store(rst + _REF_SUM * ref_stats_stride, old_s_r * f_old + s_r * f_new)
        tl.store(rst + _REF_WEIGHTED * ref_stats_stride, old_w * f_old + w * f_new)
        if not SHIFTED:
            _store_label_logit(hit, xr_ptr + row * width, ref_bias_ptr, label_col,
                               rst + _REF_LABEL_LOGIT * ref_stats_stride, logit_scale, softcap, inv_temperature,
                               HAS_REF_BIAS, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
    if SHIFTED:
        if stale:  # the rare row whose shift moved within the tile: written again at its final shifts
            at = tl.where(shift == float("-inf"), 0.0, shift)
            ref_at = at
            if REF_WEIGHTS:
                ref_at = tl.where(ref_shift == float("-inf"), 0.0, ref_shift)
            _write_weights(x_row, bias_ptr, xr_ptr, ref_bias_ptr, weights_ptr, ref_weights_ptr, row, width, at,
                           ref_at, logit_scale, softcap, inv_temperature,
                           HAS_BIAS, HAS_REF_BIAS, REF_WEIGHTS, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)
        # the accumulator rows whose shift moved from a finite one are brought to it (rows at -inf hold 0)
        if SUMS:
            _move_accumulator_row(acc_ptr + row * acc_stride, shift_ptr + row, shift, dim, BLOCK_V)
        tl.store(shift_out_ptr + row, shift)
        if REF_WEIGHTS:
            if SUMS:
                _move_accumulator_row(ref_acc_ptr + row * acc_stride, ref_shift_ptr + row, ref_shift, dim, BLOCK_V)
            tl.store(ref_shift_out_ptr + row, ref_shift)
    elif WEIGHTS:  # fold_weights: a second pass over the row (from L2), e^{z - m'} t'(x) at the row's new maxima
        ref_at = big
        if REF_WEIGHTS:
            ref_at = big_r
        _write_weights(x_row, bias_ptr, xr_ptr, ref_bias_ptr, weights_ptr, ref_weights_ptr, row, width, big, ref_at,
                       logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_REF_BIAS, REF_WEIGHTS, HAS_SCALE,
                       HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK_V)


@triton.jit
def _write_weights(x_row, bias_ptr, xr_ptr, ref_bias_ptr, weights_ptr, ref_weights_ptr, row, width, at, ref_at,
                   logit_scale, softcap, inv_temperature, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                   REF_WEIGHTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr):
    """A pass over a tile row writing its softmax weights ``e^{z - at} t'(x)`` (and the reference's
    ``e^{zr - ref_at} t'(x)``) from its logits."""
    for start in range(0, width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < width
        x = load_biased(x_row, bias_ptr, cols, inside, HAS_BIAS)
        z, slope = transform_and_slope(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP,
                                       HAS_TEMPERATURE)
        if REF_WEIGHTS:
            xr = load_biased(xr_ptr + row * width, ref_bias_ptr, cols, inside, HAS_REF_BIAS)
            zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
            tl.store(ref_weights_ptr + row * width + cols, tl.exp(zr - ref_at) * slope, mask=inside)
        tl.store(weights_ptr + row * width + cols, tl.exp(z - at) * slope, mask=inside)


@triton.jit
def _store_label_logit(hit, x_row, bias_ptr, label_col, slot, logit_scale, softcap, inv_temperature,
                       HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_TEMPERATURE: tl.constexpr):
    """The label's transformed logit of one tile row into its statistics ``slot``, where the label falls in the
    tile: read once, not picked out of every block by a reduction."""
    if hit:
        x_label = tl.load(x_row + label_col)
        if HAS_BIAS:
            x_label += tl.load(bias_ptr + label_col)
        tl.store(slot, transform(x_label, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP,
                                 HAS_TEMPERATURE))


@triton.jit
def _move_accumulator_row(acc_row, shift_slot, new, dim, BLOCK: tl.constexpr):
    """``acc_row *= e^{old - new}`` where the shift moved from a finite ``old`` (the one still in ``shift_slot``)."""
    old = tl.load(shift_slot)
    if (new != old) & (old > float("-inf")):
        factor = tl.exp(old - new)
        for start in range(0, dim, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < dim
            tl.store(acc_row + cols, tl.load(acc_row + cols, mask=inside) * factor, mask=inside)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_KL_GRAD": lambda a: a["g_kl_ptr"] is not None,
    "HAS_REF_BIAS": lambda a: a["ref_bias_ptr"] is not None,
    "FILTER": lambda a: a["deviation_ptr"] is not None,
})
@triton.jit
def _grad_tile_kernel(
    x_ptr, bias_ptr, xr_ptr, ref_bias_ptr, out_ptr, labels_ptr, lse_ptr, ref_lse_ptr, g_ptr, g_kl_ptr,
    deviation_ptr, width, v0, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_KL_GRAD: tl.constexpr, HAS_REF_BIAS: tl.constexpr, FILTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < width
    offsets = row * width + cols
    label_col = tl.load(labels_ptr + row) - v0
    g = tl.load(g_ptr + row)
    x = load_biased(x_ptr + row * width, bias_ptr, cols, inside, HAS_BIAS)
    z, slope = transform_and_slope(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP,
                                   HAS_TEMPERATURE)
    p = tl.exp(z - tl.load(lse_ptr + row))
    onehot = tl.where(cols == label_col, 1.0, 0.0)
    dz = g * (onehot - p)
    if FILTER:
        largest = tl.max(tl.where(inside, tl.abs(p - onehot), 0.0), axis=0)
    if HAS_KL_GRAD:
        xr = load_biased(xr_ptr + row * width, ref_bias_ptr, cols, inside, HAS_REF_BIAS)
        zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        p_minus_q = p - tl.exp(zr - tl.load(ref_lse_ptr + row))
        dz += tl.load(g_kl_ptr + row) * p_minus_q
        if FILTER:
            largest = tl.maximum(largest, tl.max(tl.where(inside, tl.abs(p_minus_q), 0.0), axis=0))
    tl.store(out_ptr + offsets, (dz * slope).to(out_ptr.dtype.element_ty), mask=inside)
    if FILTER:
        tl.atomic_max(deviation_ptr, largest)


@triton.heuristics({"HAS_REF": lambda a: a["ref_weights_ptr"] is not None})
@triton.jit
def _scaled_grad_kernel(
    weights_ptr, maxes_ptr, label_logits_ptr, ref_weights_ptr, ref_maxes_ptr, ref_label_logits_ptr, labels_ptr,
    lse_ptr, g_ptr, ref_lse_ptr, g_kl_ptr, out_ptr, out_stride, width, v0, logit_scale, softcap, inv_temperature,
    HAS_REF: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < width
    offsets = row * width + cols
    lse, g = tl.load(lse_ptr + row), tl.load(g_ptr + row)
    m = tl.load(maxes_ptr + row)
    m = tl.where(m == float("-inf"), 0.0, m)  # weights taken while the max was still -inf were shifted by 0
    z_y = tl.load(label_logits_ptr + row)
    p_y = tl.exp(z_y - lse)
    if HAS_REF:
        g_kl, ref_lse = tl.load(g_kl_ptr + row), tl.load(ref_lse_ptr + row)
        m_r = tl.load(ref_maxes_ptr + row)
        m_r = tl.where(m_r == float("-inf"), 0.0, m_r)
        dz = -(g - g_kl) * tl.exp(m - lse) * tl.load(weights_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        dz -= g_kl * tl.exp(m_r - ref_lse) * tl.load(ref_weights_ptr + offsets, mask=inside, other=0.0).to(
            tl.float32)
        label_dz = g * (1.0 - p_y) + g_kl * (p_y - tl.exp(tl.load(ref_label_logits_ptr + row) - ref_lse))
    else:
        dz = -g * tl.exp(m - lse) * tl.load(weights_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        label_dz = g * (1.0 - p_y)
    # the transform's slope at the label, from its transformed logit: scale / temperature (1 - tanh^2) with a softcap
    slope = 1.0
    if HAS_SCALE:
        slope = logit_scale
    if HAS_SOFTCAP:
        t = z_y / softcap
        if HAS_TEMPERATURE:
            t = t / inv_temperature
        slope = slope * (1.0 - t * t)
    if HAS_TEMPERATURE:
        slope = slope * inv_temperature
    dz = tl.where(cols == tl.load(labels_ptr + row) - v0, label_dz * slope, dz)
    tl.store(out_ptr + row * out_stride + cols, dz.to(out_ptr.dtype.element_ty), mask=inside)


def fold_tile(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions) -> None:
    """The ``fold`` kernel of :mod:`dpo_kernels.ops.linear.contract` (fp32 tiles)."""
    _fold(tile, stats, ref, ref_stats, opts, None, None)


def fold_tile_weights(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions, weights,
                      ref_weights) -> None:
    """The ``fold_weights`` kernel (``fold`` without ``weights``): the fold, then a second pass over each row writing
    its softmax weights (fp32, or the bf16/fp16 GEMM operands, or the fp16 scaled store; each may be its tile)."""
    _fold(tile, stats, ref, ref_stats, opts, weights, ref_weights)


def fold_shifted(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions, weights,
                 ref_weights, acc: Accumulator, ref_acc: Accumulator | None, headroom: float) -> None:
    """The ``fold_shifted`` kernel: the fold and a frozen head's weights at the accumulators' shifts in one pass over
    each row (a second pass over the rare row whose shift moved after its weights were written), then the
    accumulator rows whose shift moved rescaled; 4 bytes a logit read (8 with the reference), the weights
    written."""
    if tile.logits.numel() and (weights.data_ptr() == tile.logits.data_ptr() or (
            ref_weights is not None and ref is not None and ref_weights.data_ptr() == ref.logits.data_ptr())):
        raise ValueError("fold_shifted: the weights may not overwrite their tile (a moved shift rereads it)")
    sums = acc.values is not None
    if ref_acc is not None and (ref_acc.values is not None) != sums:
        raise ValueError("fold_shifted: both accumulators keep sums, or neither")
    if sums and ((ref_acc is not None and ref_acc.values.stride() != acc.values.stride())
                 or acc.values.stride(1) != 1):
        raise ValueError("fold_shifted: the accumulators' rows must be contiguous and share their stride")
    if not all(a.shift.is_contiguous() and a.new_shift.is_contiguous() for a in (acc, ref_acc) if a is not None):
        raise ValueError("fold_shifted: the shifts must be contiguous")
    _fold(tile, stats, ref, ref_stats, opts, weights, ref_weights, acc, ref_acc, headroom)


def _fold(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions, weights, ref_weights,
          acc: Accumulator | None = None, ref_acc: Accumulator | None = None, headroom: float = 0.0) -> None:
    n, width = tile.logits.shape
    if n == 0:
        return
    cfg = tile_row_config(width, with_reference=ref is not None or acc is not None)
    with on_device(tile.logits):
        _fold_tile_kernel[(n,)](
            tile.logits, tile.bias, None if ref is None else ref.logits, None if ref is None else ref.bias, tile.labels,
            stats, stats.stride(0), ref_stats, 0 if ref_stats is None else ref_stats.stride(0), weights, ref_weights,
            None if acc is None else acc.values, None if acc is None else acc.shift,
            None if ref_acc is None else ref_acc.values, None if ref_acc is None else ref_acc.shift,
            None if acc is None else acc.new_shift, None if ref_acc is None else ref_acc.new_shift,
            0 if acc is None or acc.values is None else acc.values.stride(0),
            0 if acc is None or acc.values is None else acc.values.shape[1], headroom,
            width, tile.v0, **transform_args(opts), LOGGING=has_logging_rows(stats), BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )


def grad_tile(tile: LogitsTile, lse, g, ref: LogitsTile | None, ref_lse, g_kl, opts: TokenOptions, out) -> bool:
    """The ``grad`` kernel of :mod:`dpo_kernels.ops.linear.contract` (fp32 tiles, ``out`` in any float dtype)."""
    n, width = tile.logits.shape
    if n == 0:
        return True
    cfg = tile_row_config(width, elementwise=True)
    deviation = None
    if opts.grad_filter_eps is not None:
        deviation = torch.zeros(1, dtype=torch.float32, device=tile.logits.device)
    with on_device(tile.logits):
        _grad_tile_kernel[(n, triton.cdiv(width, cfg.block_v))](
            tile.logits, tile.bias, None if g_kl is None else ref.logits, None if g_kl is None else ref.bias, out,
            tile.labels, lse, ref_lse, g, g_kl, deviation, width, tile.v0, **transform_args(opts),
            BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
    return deviation is None or deviation.item() >= opts.grad_filter_eps


def scaled_grad(tile: ScaledTile, lse, g, ref: ScaledTile | None, ref_lse, g_kl, opts: TokenOptions, out) -> None:
    """The ``scaled_grad`` kernel of :mod:`dpo_kernels.ops.linear.contract`: fp16 weights (and the reference's) in,
    ``dZ`` out in any float dtype (rows contiguous), 2 bytes a logit read (4 with the reference); one launch a
    tile."""
    n, width = tile.weights.shape
    if n == 0:
        return
    if out.stride(1) != 1 or not tile.weights.is_contiguous():
        raise ValueError("scaled_grad: the weights must be contiguous and out's rows contiguous")
    cfg = tile_row_config(width, elementwise=True)
    with on_device(tile.weights):
        _scaled_grad_kernel[(n, triton.cdiv(width, cfg.block_v))](
            tile.weights, tile.maxes, tile.label_logits, None if ref is None else ref.weights,
            None if ref is None else ref.maxes, None if ref is None else ref.label_logits, tile.labels, lse, g,
            ref_lse, g_kl, out, out.stride(0), width, tile.v0, **transform_args(opts), BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
