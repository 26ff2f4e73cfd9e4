"""The from-logits path: one contract between the autograd function and a backend, like the linear path's.

A backend supplies two row kernels (:class:`LogitsKernels`) over ``logits [R, T, V]`` (any strides; the reference's
``[R, T, V]`` in its own dtype) and flat ``labels [N]`` (``N = R*T``, int64, contiguous):

``forward(logits, ref_logits, labels, opts) -> (logp, lse, ref_logp, ref_lse, kl)``
    One pass over each row (MATH.md §1): ``[N]`` statistics in the statistics dtype; ``logp``, ``ref_logp`` and
    ``kl`` exactly 0 at ignored tokens (``lse`` and ``ref_lse`` there are whatever the same backend's backward
    needs), NaN for a row without a softmax or an out-of-range label; the three reference outputs are ``None``
    without ``ref_logits``. Nothing of size ``[N, V]`` is written.

``backward(logits, ref_logits, labels, lse, ref_lse, g, g_kl, opts, grad) -> None``
    Writes ``dL/dlogits = transform'(x) (g (onehot - p) + g_kl (p - q))`` into ``grad [R, T, V]`` (the logits' dtype;
    ``grad`` may be ``logits`` itself with ``inplace_backward``: every element is read before it is written). ``g``
    and ``g_kl`` are ``[N]``, 0 at ignored tokens (whose rows come out exactly 0); ``ref_logits``, ``ref_lse`` and
    ``g_kl`` are ``None`` when the KL received no gradient, and the reference is then not read.

:func:`token_stats` is the one autograd function over them: it keeps ``lse`` (and ``ref_lse``) for the backward,
refuses an in-place backward into a leaf, skips the reference when the KL gets no gradient, and marks overwritten
logits. The compiled ops of :mod:`dpo_kernels.ops.linear.library_ops` call the same two kernels; vocabulary-parallel
slices of logits run the linear path's tile loop over the given logits instead
(:func:`dpo_kernels.ops.linear.driver.logits_token_stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import TokenOptions
from .common import first_order_only
from .inplace import mark_logits_overwritten, refuse_leaf_logits


@dataclass(frozen=True)
class LogitsKernels:
    """A backend's two from-logits row kernels (see the module docstring for their exact contract)."""

    forward: Callable[..., tuple]
    backward: Callable[..., None]


def _kl_outputs(ctx, logp: torch.Tensor, ref_logp: torch.Tensor, kl: torch.Tensor, shape: torch.Size):
    """The ``(logp, ref_logp, kl)`` outputs, viewed as ``shape``; ``ref_logp`` is marked
    non-differentiable because the reference receives no gradient."""
    ref_logp = ref_logp.view(shape)
    ctx.mark_non_differentiable(ref_logp)
    return logp.view(shape), ref_logp, kl.view(shape)


def _upstream(grad: torch.Tensor | None, labels: torch.Tensor, ignore_index: int, dtype=torch.float32):
    """The incoming gradient of a per-token output as a contiguous ``[N]`` vector (fp32 unless told), 0 at ignored
    tokens (and everywhere when the output is unused), so masked tokens receive exactly zero gradient."""
    if grad is None:
        return torch.zeros(labels.numel(), dtype=dtype, device=labels.device)
    g = grad.reshape(-1).to(dtype)
    return torch.where(labels.reshape(-1) != ignore_index, g, torch.zeros((), dtype=dtype, device=g.device)).contiguous()


def upstream_pair(grad_logp, grad_kl, labels: torch.Tensor, ignore_index: int, dtype=torch.float32):
    """``(g, g_kl)`` of the backward via :func:`_upstream`; ``g_kl`` is ``None`` when the KL output
    received no gradient (so kernels can skip the reference entirely)."""
    g = _upstream(grad_logp, labels, ignore_index, dtype)
    return g, (None if grad_kl is None else _upstream(grad_kl, labels, ignore_index, dtype))


class _LogitsStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref_logits, opts: TokenOptions, kernels: LogitsKernels):
        ctx.set_materialize_grads(False)  # an unused KL output arrives as None: the reference is then not read
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        flat = labels.reshape(-1).contiguous()
        logp, lse, ref_logp, ref_lse, kl = kernels.forward(logits, ref_logits, flat, opts)
        ctx.save_for_backward(logits, flat, lse, ref_logits, ref_lse)
        ctx.opts, ctx.kernels = opts, kernels
        if ref_logits is None:
            return logp.view(labels.shape)
        return _kl_outputs(ctx, logp, ref_logp, kl, labels.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, *grad_rest):
        grad_kl = grad_rest[1] if grad_rest else None
        if grad_logp is None and grad_kl is None:
            return None, None, None, None, None
        logits, labels, lse, ref_logits, ref_lse = ctx.saved_tensors
        opts = ctx.opts
        g, g_kl = upstream_pair(grad_logp, grad_kl, labels, opts.ignore_index, lse.dtype)
        grad = logits if opts.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        use_ref = g_kl is not None
        ctx.kernels.backward(logits, ref_logits if use_ref else None, labels, lse, ref_lse if use_ref else None, g,
                             g_kl, opts, grad)
        if opts.inplace_backward:
            mark_logits_overwritten(logits)
        return grad, None, None, None, None


def token_stats(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions,
                kernels: LogitsKernels):
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``, or ``(logp, ref_logp, kl)`` with ``ref_logits``
    (which receives no gradient), on ``kernels``."""
    return _LogitsStats.apply(logits, labels, None if ref_logits is None else ref_logits.detach(), opts, kernels)
