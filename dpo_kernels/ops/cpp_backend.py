"""The ``cpu`` and ``cuda`` backends: the C++ / CUDA C++ kernels of ``dpo_kernels._C`` (sources in ``csrc/``).

Both backends are this one module: every op is registered per device (``csrc/cpu`` for CPU tensors,
``csrc/cuda`` for CUDA tensors) and the dispatcher picks the implementation from the inputs' device.

From logits: one fused pass over each row in the forward (online log-sum-exp, and the KL's sums with a reference),
``O(N)`` statistics saved; the backward recomputes the softmax per row and writes the gradient, into the logits'
own storage with ``inplace_backward`` (the row kernels of :mod:`dpo_kernels.ops.logits_path`). From hidden
states: the linear path of :mod:`dpo_kernels.ops.linear` with the ``fold_tile`` / ``grad_tile`` ops as its tile
kernels, and every optional one: ``fold_tile_weights``, ``fold_tile_shifted`` (a frozen head's sums and the scaled
store at lazily moved shifts) and ``scaled_grad_tile`` (``dZ`` from the scaled store). :data:`KERNELS` holds both.
"""

from __future__ import annotations

import torch

from ..options import TokenOptions
from . import extension
from .backend import BackendKernels
from .linear.contract import Accumulator, LogitsTile, ScaledTile, TileKernels, has_logging_rows
from .logits_path import LogitsKernels


def _ops():
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    return torch.ops.dpo_kernels


def _transform(opts: TokenOptions) -> tuple[float, float, float]:
    return float(opts.logit_scale), float(opts.softcap or 0.0), 1.0 / float(opts.temperature)


def logits_forward(logits, ref_logits, labels, opts: TokenOptions):
    """The from-logits ``forward`` kernel (:mod:`dpo_kernels.ops.logits_path`): ``dpo_kernels::logits_forward``."""
    logp, lse, ref_logp, ref_lse, kl = _ops().logits_forward(logits, labels, ref_logits, opts.ignore_index,
                                                             *_transform(opts))
    return (logp, lse, None, None, None) if ref_logits is None else (logp, lse, ref_logp, ref_lse, kl)


def logits_backward(logits, ref_logits, labels, lse, ref_lse, g, g_kl, opts: TokenOptions, grad) -> None:
    """The from-logits ``backward`` kernel: ``dpo_kernels::logits_backward``."""
    _ops().logits_backward(logits, labels, lse, g, ref_logits, ref_lse, g_kl, grad, opts.ignore_index,
                           *_transform(opts))


def logits_fold(logits, ref_logits, labels, opts: TokenOptions, stats, ref_stats) -> None:
    """The from-logits ``fold`` kernel: ``dpo_kernels::logits_fold``."""
    _ops().logits_fold(logits, labels, stats, ref_logits, ref_stats, opts.ignore_index, *_transform(opts))


def fold_tile(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions) -> None:
    """The ``fold`` kernel of :mod:`dpo_kernels.ops.linear.contract`: ``torch.ops.dpo_kernels.fold_tile``."""
    _ops().fold_tile(
        tile.logits, tile.bias, tile.v0, tile.labels, stats, has_logging_rows(stats),
        None if ref is None else ref.logits, None if ref is None else ref.bias, ref_stats, *_transform(opts),
    )


def fold_tile_weights(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions, weights,
                      ref_weights) -> None:
    """The optional ``fold_weights`` kernel: ``torch.ops.dpo_kernels.fold_tile_weights`` (CPU: written beside the
    fold; CUDA: a second launch over the tile after it)."""
    _ops().fold_tile_weights(
        tile.logits, tile.bias, tile.v0, tile.labels, stats, None if ref is None else ref.logits,
        None if ref is None else ref.bias, ref_stats, weights, ref_weights, *_transform(opts),
    )


def fold_tile_shifted(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions, weights,
                      ref_weights, acc: Accumulator, ref_acc: Accumulator | None, headroom: float) -> None:
    """The optional ``fold_shifted`` kernel: ``torch.ops.dpo_kernels.fold_tile_shifted`` (CPU: written beside the
    fold, a row's weights after its whole row is read, so they may overwrite the tile; CUDA: a second launch over the
    tile after the fold, each entry read before it is written, a block a row moving its shift)."""
    if ref_acc is not None and (ref_acc.values is None) != (acc.values is None):
        raise ValueError("fold_shifted: both accumulators keep sums, or neither")
    _ops().fold_tile_shifted(
        tile.logits, tile.bias, tile.v0, tile.labels, stats, None if ref is None else ref.logits,
        None if ref is None else ref.bias, ref_stats, weights, ref_weights, acc.values, acc.shift,
        None if ref_acc is None else ref_acc.values, None if ref_acc is None else ref_acc.shift, acc.shift_out,
        None if ref_acc is None else ref_acc.shift_out, float(headroom), *_transform(opts),
    )


def scaled_grad_tile(tile: ScaledTile, lse, g, ref: ScaledTile | None, ref_lse, g_kl, opts: TokenOptions,
                     out) -> None:
    """The optional ``scaled_grad`` kernel: ``torch.ops.dpo_kernels.scaled_grad_tile``."""
    _ops().scaled_grad_tile(
        tile.weights, tile.maxes, tile.label_logits, tile.v0, tile.labels, lse, g,
        None if ref is None else ref.weights, None if ref is None else ref.maxes,
        None if ref is None else ref.label_logits, ref_lse if ref is not None else None,
        g_kl if ref is not None else None, out, *_transform(opts),
    )


def grad_tile(tile: LogitsTile, lse, g, ref: LogitsTile | None, ref_lse, g_kl, opts: TokenOptions, out) -> bool:
    """The ``grad`` kernel of :mod:`dpo_kernels.ops.linear.contract`: ``torch.ops.dpo_kernels.grad_tile``."""
    eps = -1.0 if opts.grad_filter_eps is None else float(opts.grad_filter_eps)
    return bool(_ops().grad_tile(
        tile.logits, tile.bias, tile.v0, tile.labels, lse, g, None if ref is None else ref.logits,
        None if ref is None else ref.bias, ref_lse, g_kl, out, eps, *_transform(opts),
    ))


KERNELS = BackendKernels(logits=LogitsKernels(forward=logits_forward, backward=logits_backward, fold=logits_fold),
                         tiles=TileKernels(fold=fold_tile, grad=grad_tile, fold_weights=fold_tile_weights,
                                           fold_shifted=fold_tile_shifted, scaled_grad=scaled_grad_tile,
                                           fold_shifted_in_place=True))
