"""The one contract between the tile loop and a backend: two fused kernels over a tile of logits.

The tile loop computes every tile ``x = h W_c^T`` with a GEMM whose output is fp32 (fp64 for fp64 inputs), for the
tokens that are not ignored (every label of a tile is a valid vocabulary id). A backend supplies:

``fold(tile, stats, ref, ref_stats, opts) -> None``
    Adds the bias, applies the logit transform (MATH.md §1: scale, softcap, temperature) and folds the tile
    into the running per-token statistics, in place. ``stats`` is ``[3, n]`` (:data:`STATS_ROWS`: running max,
    running sum of ``exp(z - max)``, label logit where the label falls in the tile); with a reference tile,
    ``ref_stats`` is ``[4, n]`` (:data:`REF_STATS_ROWS`: the reference's max, sum and label logit, and
    ``w = sum_v e^{zr_v - mr} (zr_v - z_v)``, rescaled whenever ``mr`` moves). The rows may be strided views
    (``stats[:, n0:n1]``). When ``stats`` has the logging rows (:func:`has_logging_rows`), the fold also keeps the statistics trainers only log
    (:data:`LOGGING_ROWS`): ``sum_v e^{z_v - m} z_v`` and ``sum_v e^{2 (z_v - m)}`` (rescaled by ``e^{m - m'}`` and its
    square when the max moves), ``sum_v z_v``, and the largest ``z`` left of the label's column (for "the label is the
    first argmax"), all in the same pass.

``grad(tile, lse, g, ref, ref_lse, g_kl, opts, out) -> bool``
    Writes ``dL/dx = transform'(x) * (g (onehot - p) + g_kl (p - q))`` into ``out`` (``[n, w]``, the GEMM operand
    dtype; ``out`` may be ``tile.logits`` itself when the dtypes agree), with ``p = exp(z - lse)`` and
    ``q = exp(zr - ref_lse)``. ``ref``, ``ref_lse`` and ``g_kl`` are ``None`` when the KL output received no
    gradient: the reference is then not read at all. With ``opts.grad_filter_eps`` set, returns ``False`` (and
    ``out`` is unspecified) when every ``|p - onehot|`` (and ``|p - q|``) of the tile is below it; else ``True``.

``fold_weights(tile, stats, ref, ref_stats, opts, weights, ref_weights) -> None`` (optional)
    ``fold`` (the logging rows too, when ``stats`` has them), and the tile's softmax weights after it (a frozen
    head's, the eager schedule's scaled store): ``weights [n, w]`` (contiguous, the tile's dtype or a narrower float
    dtype, rounded once; may be ``tile.logits`` itself) ``= e^{z - m'} t'(x)`` with ``m'`` the running max after this
    tile and ``t'`` the transform's slope at the raw (biased) logit, and, with ``ref_weights`` (may be ``ref.logits``),
    ``e^{zr - mr'} t'(x)`` with the reference's max and the policy's slope. A maximum still ``-inf`` shifts by 0.
    A backend without it gets the same values from PyTorch ops after its ``fold`` (:func:`unfused_fold_weights`).

``fold_shifted(tile, stats, ref, ref_stats, opts, weights, ref_weights, acc, ref_acc, headroom) -> None`` (optional)
    ``fold_weights`` for a frozen head's running sums (:class:`Accumulator`), with ``weights`` (``ref_weights``)
    never the tile itself unless the backend's ``fold_shifted_in_place`` says it may be (weights of the tile's
    dtype over their tile): the weights are taken at each row's
    *shift* ``s'`` instead of its running max, ``weights = e^{z - s'} t'(x)`` (with ``ref_acc``:
    ``ref_weights = e^{zr - s_r'} t'(x)``), and the kernel writes ``s'`` into ``acc.new_shift`` (``ref_acc``'s):
    ``s' = s`` (the shift before this tile) unless the row's running max after it, ``m'``, exceeds ``s + headroom``;
    then some ``s'`` with ``m' - headroom <= s' <= m'``. Where a row's shift moved from a finite ``s``, the kernel
    multiplies that row of ``acc.values`` by ``e^{s - s'}`` (a row whose shift was ``-inf`` holds 0). The caller
    then adds ``weights W_c`` into ``acc.values``, and every row stays a sum at its shift (or, without ``values``,
    keeps the weights and ``s'``: the eager schedule's scaled store). The shift moves rarely
    (as a flash-attention output that is rescaled only when its max grows past a threshold), so a tile costs one
    read of the logits and no pass over the accumulator. A backend without it gets :func:`unfused_fold_shifted`:
    ``fold_weights`` at ``s' = m'`` and every row rescaled (a pass over ``acc.values`` a tile).

``scaled_grad(tile, lse, g, ref, ref_lse, g_kl, opts, out) -> None`` (optional)
    ``grad`` over a tile kept as its softmax weights (:class:`ScaledTile`, the eager schedule's scaled store), with
    no gradient filter: writes ``out = -(g - g_kl) e^{m - lse} a - g_kl e^{m_r - lse_r} a_r`` (``m``: the shift
    the weights were taken at, 0 where it is ``-inf``; the reference's term only with ``ref``), and at
    each token's label column, where it falls in the tile, the exact
    ``t'(z_y) (g (1 - e^{z_y - lse}) + g_kl (e^{z_y - lse} - e^{zr_y - lse_r}))`` from the label logits. A backend
    without it gets the same values from PyTorch ops (:func:`unfused_scaled_grad`).

Each kernel reads the tile once and writes only ``O(n)`` values (fold), the one ``dZ`` tile (grad, scaled_grad) or
the weights over the tile (fold_weights, fold_shifted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
import math

import torch


class StatRow(IntEnum):
    """The rows of a policy ``stats`` buffer (the same layout as ``csrc/stats_layout.h``): the first three always,
    the four logging rows when the statistics trainers only log are asked for."""

    MAX = 0
    SUM = 1
    LABEL_LOGIT = 2
    WEIGHTED_LOGITS = 3
    SQUARES = 4
    LOGIT_SUM = 5
    MAX_BEFORE_LABEL = 6


class RefRow(IntEnum):
    """The rows of a reference ``ref_stats`` buffer: its max, sum and label logit, and the KL's ``w``."""

    MAX = 0
    SUM = 1
    LABEL_LOGIT = 2
    WEIGHTED = 3


STATS_ROWS = ("max", "sum", "label_logit")
REF_STATS_ROWS = ("max", "sum", "label_logit", "weighted")
LOGGING_ROWS = ("weighted_logits", "squares", "logit_sum", "max_before_label")  # after STATS_ROWS, when asked
LOGGED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # what the logging rows give, TRL's names
ROWS_WITH_LOGGING = len(STATS_ROWS) + len(LOGGING_ROWS)


def has_logging_rows(stats: torch.Tensor) -> bool:
    """Whether a policy ``stats`` buffer was allocated with the logging rows (:func:`new_stats` with ``logging``)."""
    return stats.shape[0] == ROWS_WITH_LOGGING


@dataclass(frozen=True)
class LogitsTile:
    """Raw logits of ``n`` tokens for vocabulary columns ``v0 .. v0 + w``.

    Attributes:
        logits: ``[n, w]`` contiguous, fp32 (fp64 for fp64 inputs): the GEMM output, before bias and transform.
        bias: ``[w]`` in the logits' dtype, or ``None``.
        v0: the first vocabulary column of the tile.
        labels: ``[n]`` int64 vocabulary ids of the tile's tokens (never ``ignore_index``).
    """

    logits: torch.Tensor
    bias: torch.Tensor | None
    v0: int
    labels: torch.Tensor


@dataclass(frozen=True)
class ScaledTile:
    """A tile kept as its softmax weights (the eager schedule's scaled store, :mod:`.plan`).

    Attributes:
        weights: ``[n, w]`` contiguous fp16: ``e^{z - m} t'(x)`` of the tile's columns ``v0 .. v0 + w``.
        maxes: ``[n]`` fp32: the shift ``m`` each row's weights were taken at (``-inf``: shifted by 0), at most the
            running max after the tile (``fold_shifted``).
        v0: the first vocabulary column of the tile.
        labels: ``[n]`` int64 vocabulary ids (local to the head's slice; a label outside the tile is not written).
        label_logits: ``[n]`` fp32: each token's transformed logit at its label (the reference's at the policy's
            label for a reference tile), read only where the label falls in the tile.
    """

    weights: torch.Tensor
    maxes: torch.Tensor
    v0: int
    labels: torch.Tensor
    label_logits: torch.Tensor


@dataclass(frozen=True)
class Accumulator:
    """A frozen head's running sum of softmax-weighted head rows for ``n`` tokens (MATH.md §1), kept at a shift; or
    the shift alone (``values`` ``None``: the eager schedule's scaled store keeps the weights themselves).

    Attributes:
        values: ``[n, D]`` in the statistics dtype: ``sum_v e^{z_v - s} t'(x_v) W_v`` over the columns folded so far;
            or ``None``.
        shift: ``[n]`` in the statistics dtype: ``s``, ``-inf`` while every logit so far was ``-inf`` (``values``
            then 0); never above the running max, never below it by more than the ``headroom`` of the last fold.
        shift_out: ``[n]`` where ``fold_shifted`` writes the new shift ``s'``, ``shift`` itself when ``None`` (the
            scaled store keeps each chunk's shifts: it reads the previous chunk's row and writes this chunk's).
    """

    values: torch.Tensor | None
    shift: torch.Tensor
    shift_out: torch.Tensor | None = None

    @property
    def new_shift(self) -> torch.Tensor:
        """Where ``s'`` is written."""
        return self.shift if self.shift_out is None else self.shift_out


# A shift trails its row's max by at most this much (fewer where the weights' dtype is narrow: shift_headroom): far
# below the exponent range of bf16 and fp32 weights and of an fp32 sum of 2^20 of them times head entries of 2^10.
SHIFT_HEADROOM = 32.0


def shift_headroom(weights_dtype: torch.dtype, opts) -> float:
    """The ``headroom`` of ``fold_shifted`` for weights of ``weights_dtype``: a weight ``e^{z - s} t'(x)`` stays
    below the dtype's largest finite value by a factor ``e`` with ``t' <= |logit_scale| / temperature`` (fp16: about
    10; bf16, fp32, fp64: :data:`SHIFT_HEADROOM`)."""
    slope = max(1.0, abs(opts.logit_scale) / opts.temperature)
    room = math.log(torch.finfo(weights_dtype).max) - math.log(slope) - 1.0
    return max(0.0, min(SHIFT_HEADROOM, room))


@dataclass(frozen=True)
class TileKernels:
    """A backend's fused tile kernels (see the module docstring for their exact contract); ``fold_weights``,
    ``fold_shifted`` and ``scaled_grad`` are optional."""

    fold: Callable[..., None]
    grad: Callable[..., bool]
    fold_weights: Callable[..., None] | None = None
    scaled_grad: Callable[..., None] | None = None
    fold_shifted: Callable[..., None] | None = None
    fold_shifted_in_place: bool = False  # its fold_shifted may write weights of the tile's dtype over the tile


def finish_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``lse = m + log(s)`` from a running max and sum, NaN where the row held NaN or +inf (MATH.md §1: such a row
    has no softmax; its statistics are NaN, never a plausible finite number or a ``-inf`` that would let a pair drop
    out of a loss). The same rule is ``finish_lse`` in ``csrc/transform.h`` and in the Triton helpers."""
    return torch.where(torch.isnan(m) | (m == float("inf")), float("nan"), m + torch.log(s))


def finite_shift(m: torch.Tensor) -> torch.Tensor:
    """The shift of an online log-sum-exp step: the running max ``m``, or 0 where it is still ``-inf`` (every logit so
    far a probability 0), where ``-inf - -inf`` would be NaN (``shift_of`` in ``csrc/cpu/row_kernels.h``)."""
    return torch.where(torch.isneginf(m), torch.zeros((), dtype=m.dtype, device=m.device), m)


def new_stats(n: int, dtype: torch.dtype, device: torch.device, *, logging: bool = False) -> torch.Tensor:
    """A policy's ``[rows, n]`` statistics before any tile (:class:`StatRow`; the logging rows with ``logging``):
    the maxima ``-inf``, everything else 0."""
    stats = torch.zeros((ROWS_WITH_LOGGING if logging else len(STATS_ROWS), n), dtype=dtype, device=device)
    stats[StatRow.MAX].fill_(float("-inf"))
    if logging:
        stats[StatRow.MAX_BEFORE_LABEL].fill_(float("-inf"))
    return stats


def new_ref_stats(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reference's ``[4, n]`` statistics before any tile (:class:`RefRow`)."""
    stats = torch.zeros((len(REF_STATS_ROWS), n), dtype=dtype, device=device)
    stats[RefRow.MAX].fill_(float("-inf"))
    return stats


def logging_outputs(stats: torch.Tensor, lse: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
    """The per-token statistics TRL logs, from a ``[7, n]`` policy ``stats``: ``entropy = lse - sum p z``,
    ``log_sum_sq_probs = log sum p^2``, ``mean_logits = mean_v z`` and ``is_top1`` (the label is the first argmax)."""
    m, s, label = stats[StatRow.MAX], stats[StatRow.SUM], stats[StatRow.LABEL_LOGIT]
    weighted, squares = stats[StatRow.WEIGHTED_LOGITS], stats[StatRow.SQUARES]
    logit_sum, before = stats[StatRow.LOGIT_SUM], stats[StatRow.MAX_BEFORE_LABEL]
    entropy, log_sum_sq = lse - weighted / s, torch.log(squares) - 2 * torch.log(s)
    values = (entropy, log_sum_sq, logit_sum / vocab, (label >= m) & (label > before))
    return dict(zip(LOGGED_OUTPUTS, values, strict=True))


def fold_with_weights(kernels: TileKernels, tile: LogitsTile, stats: torch.Tensor, ref: LogitsTile | None,
                      ref_stats: torch.Tensor | None, opts, weights: torch.Tensor,
                      ref_weights: torch.Tensor | None) -> None:
    """The ``fold_weights`` contract on ``kernels``: their fused kernel, else :func:`unfused_fold_weights`."""
    if kernels.fold_weights is not None:
        kernels.fold_weights(tile, stats, ref, ref_stats, opts, weights, ref_weights)
    else:
        unfused_fold_weights(kernels.fold, tile, stats, ref, ref_stats, opts, weights, ref_weights)


def unfused_fold_weights(fold: Callable[..., None], tile: LogitsTile, stats: torch.Tensor, ref: LogitsTile | None,
                         ref_stats: torch.Tensor | None, opts, weights: torch.Tensor,
                         ref_weights: torch.Tensor | None) -> None:
    """The ``fold_weights`` contract from a backend's ``fold`` and PyTorch ops: the fold, then the weights in more
    passes over the tile (what a backend without a fused ``fold_weights`` runs)."""
    from ..transform import slope_at, transform_logits  # the PyTorch transform, for the weights only

    fold(tile, stats, ref, ref_stats, opts)
    z = transform_logits(tile.logits if tile.bias is None else tile.logits + tile.bias, opts)
    slope = None if opts.is_identity_transform else slope_at(z, opts)  # before weights (maybe the tile) is written
    if ref_weights is not None:
        zr = transform_logits(ref.logits if ref.bias is None else ref.logits + ref.bias, opts)
        _softmax_weights(zr, ref_stats[RefRow.MAX], ref_weights, slope)
    _softmax_weights(z, stats[StatRow.MAX], weights, slope)


def fold_shifted(kernels: TileKernels, tile: LogitsTile, stats: torch.Tensor, ref: LogitsTile | None,
                 ref_stats: torch.Tensor | None, opts, weights: torch.Tensor, ref_weights: torch.Tensor | None,
                 acc: Accumulator, ref_acc: Accumulator | None) -> None:
    """The ``fold_shifted`` contract on ``kernels`` (the headroom from :func:`shift_headroom`): their fused kernel,
    else :func:`unfused_fold_shifted`."""
    if kernels.fold_shifted is not None:
        kernels.fold_shifted(tile, stats, ref, ref_stats, opts, weights, ref_weights, acc, ref_acc,
                             shift_headroom(weights.dtype, opts))
    else:
        unfused_fold_shifted(kernels, tile, stats, ref, ref_stats, opts, weights, ref_weights, acc, ref_acc)


def unfused_fold_shifted(kernels: TileKernels, tile: LogitsTile, stats: torch.Tensor, ref: LogitsTile | None,
                         ref_stats: torch.Tensor | None, opts, weights: torch.Tensor,
                         ref_weights: torch.Tensor | None, acc: Accumulator, ref_acc: Accumulator | None) -> None:
    """The ``fold_shifted`` contract from ``fold_weights``: the weights at the running max after the tile
    (``s' = m'``), and every row of the accumulators brought to it."""
    fold_with_weights(kernels, tile, stats, ref, ref_stats, opts, weights, ref_weights)
    _move_shift(acc, stats[StatRow.MAX])
    if ref_acc is not None:
        _move_shift(ref_acc, ref_stats[RefRow.MAX])


def _move_shift(acc: Accumulator, new: torch.Tensor) -> None:
    """``values *= e^{s - s'}``, ``s'`` written to ``acc.new_shift`` (a row whose shift was ``-inf`` holds 0 and
    stays 0)."""
    if acc.values is not None:
        acc.values.mul_(shift_factor(acc.shift, new).unsqueeze(1))
    acc.new_shift.copy_(new)


def shift_factor(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``e^{old - new}`` for sums kept at shift ``old`` brought to ``new``; 0 where ``old`` is ``-inf`` (the sum is
    0 there; ``new`` may be ``-inf`` too)."""
    return torch.where(torch.isneginf(old), torch.zeros((), dtype=old.dtype, device=old.device),
                       torch.exp(old - finite_shift(new)))


def _softmax_weights(z: torch.Tensor, m: torch.Tensor, out: torch.Tensor, slope: torch.Tensor | None) -> None:
    """``out = e^{z - m} * slope`` per row, shifting by 0 where ``m`` is still ``-inf``; ``out`` may be ``z``, or of
    a narrower dtype (then computed in ``z``'s and rounded once)."""
    shift = finite_shift(m)
    if out.dtype != z.dtype:
        weights = torch.sub(z, shift.unsqueeze(1)).exp_()
        out.copy_(weights if slope is None else weights.mul_(slope))
        return
    torch.sub(z, shift.unsqueeze(1), out=out).exp_()
    if slope is not None:
        out.mul_(slope)


def scaled_grad(kernels: TileKernels, tile: ScaledTile, lse: torch.Tensor, g: torch.Tensor, ref: ScaledTile | None,
                ref_lse: torch.Tensor | None, g_kl: torch.Tensor | None, opts, out: torch.Tensor) -> None:
    """The ``scaled_grad`` contract on ``kernels``: their fused kernel, else :func:`unfused_scaled_grad`."""
    if kernels.scaled_grad is not None:
        kernels.scaled_grad(tile, lse, g, ref, ref_lse, g_kl, opts, out)
    else:
        unfused_scaled_grad(tile, lse, g, ref, ref_lse, g_kl, opts, out)


def unfused_scaled_grad(tile: ScaledTile, lse: torch.Tensor, g: torch.Tensor, ref: ScaledTile | None,
                        ref_lse: torch.Tensor | None, g_kl: torch.Tensor | None, opts, out: torch.Tensor) -> None:
    """The ``scaled_grad`` contract from PyTorch ops: the scaled weights in one pass (two with a reference, through
    an fp32 temporary), then the label column by a gather and a scatter of one entry per token (no host read)."""
    from ..transform import slope_at

    g_p = g if g_kl is None else g - g_kl
    scale = torch.exp(finite_shift(tile.maxes) - lse).mul_(g_p).neg_().unsqueeze(1)
    if ref is None:
        torch.mul(tile.weights, scale, out=out)
    else:
        ref_scale = torch.exp(finite_shift(ref.maxes) - ref_lse).mul_(g_kl).neg_().unsqueeze(1)
        torch.addcmul(torch.mul(ref.weights, ref_scale), tile.weights, scale, out=out)
    p_y = torch.exp(tile.label_logits - lse)
    value = g * (1 - p_y)
    if ref is not None:
        value = value + g_kl * (p_y - torch.exp(ref.label_logits - ref_lse))
    if not opts.is_identity_transform:
        value = value * slope_at(tile.label_logits, opts)
    col = tile.labels - tile.v0
    inside = (col >= 0) & (col < out.shape[1])
    index = col.clamp(0, out.shape[1] - 1).unsqueeze(1)
    kept = out.gather(1, index).squeeze(1).to(value.dtype)
    out.scatter_(1, index, torch.where(inside, value, kept).to(out.dtype).unsqueeze(1))
