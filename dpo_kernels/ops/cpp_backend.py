"""The ``cpu`` and ``cuda`` backends: the C++ / CUDA C++ kernels of ``dpo_kernels._C`` (sources in ``csrc/``).

Both backends are this one module: every op is registered per device (``csrc/cpu`` for CPU tensors,
``csrc/cuda`` for CUDA tensors) and the dispatcher picks the implementation from the inputs' device.

From logits: one fused pass over each row in the forward (online log-sum-exp, and the KL's sums with a reference),
``O(N)`` statistics saved; the backward recomputes the softmax per row and writes the gradient, into the logits'
own storage with ``inplace_backward``. From hidden states: the linear path of :mod:`dpo_kernels.ops.linear` with
the ``fold_tile`` / ``grad_tile`` ops as its tile kernels (:data:`TILE_KERNELS`).
"""

from __future__ import annotations

import torch

from ..options import TokenOptions
from . import extension
from .common import LinearHead, first_order_only, kl_outputs, upstream_grads
from .inplace import mark_logits_overwritten, refuse_leaf_logits
from .linear import driver
from .linear.contract import LogitsTile, TileKernels


def _ops():
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    return torch.ops.dpo_kernels


def _transform(opts: TokenOptions) -> tuple[float, float, float]:
    return float(opts.logit_scale), float(opts.softcap or 0.0), 1.0 / float(opts.temperature)


class _LogitsFunction(torch.autograd.Function):
    """Policy log-probs (and, with reference logits, reference log-probs and KL) from ``[R, T, V]`` logits."""

    @staticmethod
    def forward(ctx, logits, labels, ref_logits, opts: TokenOptions):
        ctx.set_materialize_grads(False)  # an unused KL output arrives as None: the reference is then not read
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        labels_flat = labels.reshape(-1).contiguous()
        logp, lse, ref_logp, ref_lse, kl = _ops().logits_forward(
            logits, labels_flat, ref_logits, opts.ignore_index, *_transform(opts)
        )
        ctx.save_for_backward(logits, labels_flat, lse, ref_logits, ref_lse if ref_logits is not None else None)
        ctx.opts = opts
        if ref_logits is None:
            return logp.view(labels.shape)
        return kl_outputs(ctx, logp, ref_logp, kl, labels.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, *grad_rest):
        grad_kl = grad_rest[1] if grad_rest else None
        if grad_logp is None and grad_kl is None:
            return None, None, None, None
        logits, labels, lse, ref_logits, ref_lse = ctx.saved_tensors
        opts = ctx.opts
        g, g_kl = upstream_grads(grad_logp, grad_kl, labels, opts.ignore_index, lse.dtype)
        grad = logits if opts.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _ops().logits_backward(
            logits, labels, lse, g, ref_logits if g_kl is not None else None, ref_lse if g_kl is not None else None,
            g_kl, grad, opts.ignore_index, *_transform(opts),
        )
        if opts.inplace_backward:
            mark_logits_overwritten(logits)
        return grad, None, None, None


def fold_tile(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions) -> None:
    """The ``fold`` kernel of :mod:`dpo_kernels.ops.linear.contract`: ``torch.ops.dpo_kernels.fold_tile``."""
    _ops().fold_tile(
        tile.logits, tile.bias, tile.v0, tile.labels, stats, None if ref is None else ref.logits,
        None if ref is None else ref.bias, ref_stats, *_transform(opts),
    )


def grad_tile(tile: LogitsTile, lse, g, ref: LogitsTile | None, ref_lse, g_kl, opts: TokenOptions, out) -> bool:
    """The ``grad`` kernel of :mod:`dpo_kernels.ops.linear.contract`: ``torch.ops.dpo_kernels.grad_tile``."""
    eps = -1.0 if opts.grad_filter_eps is None else float(opts.grad_filter_eps)
    return bool(_ops().grad_tile(
        tile.logits, tile.bias, tile.v0, tile.labels, lse, g, None if ref is None else ref.logits,
        None if ref is None else ref.bias, ref_lse, g_kl, out, eps, *_transform(opts),
    ))


TILE_KERNELS = TileKernels(fold=fold_tile, grad=grad_tile)


def linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions,
                       logging: bool = False, head_context=None):
    """The linear path on the C++ / CUDA tile kernels (see :mod:`dpo_kernels.ops.linear.driver`)."""
    return driver.linear_token_stats(policy, ref, labels, opts, TILE_KERNELS, logging, head_context=head_context)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    return _LogitsFunction.apply(logits, labels, None, opts)


def token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions):
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
    return _LogitsFunction.apply(logits, labels, ref_logits.detach(), opts)
