"""The from-logits path: one contract between the path's op and a backend, like the linear path's.

A backend supplies three row kernels (:class:`LogitsKernels`) over ``logits [R, T, V]`` (any strides; the reference's
``[R, T, V]`` in its own dtype) and flat ``labels [N]`` (``N = R*T``, int64, contiguous):

``forward(logits, ref_logits, labels, opts) -> (logp, lse, ref_logp, ref_lse, kl)``
    One pass over each row (MATH.md §1): ``[N]`` statistics in the statistics dtype; ``logp``, ``ref_logp`` and
    ``kl`` exactly 0 at ignored tokens (``lse`` and ``ref_lse`` there are whatever the same backend's backward
    needs), NaN for a row without a softmax or an out-of-range label; the three reference outputs are ``None``
    without ``ref_logits``. Nothing of size ``[N, V]`` is written.

``fold(logits, ref_logits, labels, opts, stats, ref_stats) -> None``
    The named statistics of the tile loop (:class:`~dpo_kernels.ops.linear.contract.StatRow`: max, sum, label logit;
    :class:`~dpo_kernels.ops.linear.contract.RefRow`: the reference's, and ``w``) of each row over all its columns,
    folded in place into ``stats [3, N]`` and ``ref_stats [4, N]`` (statistics dtype; fresh: max ``-inf``, the rest
    0), for a vocabulary slice of the logits. Labels are columns of the row: one outside ``[0, V)`` (held by another
    rank) adds no label logit; a row whose label is ``ignore_index`` has unspecified statistics.

``backward(logits, ref_logits, labels, lse, ref_lse, g, g_kl, opts, grad) -> None``
    Writes ``dL/dlogits = transform'(x) (g (onehot - p) + g_kl (p - q))`` into ``grad [R, T, V]`` (the logits' dtype;
    ``grad`` may be ``logits`` itself with ``inplace_backward``: every element is read before it is written). ``g``
    and ``g_kl`` are ``[N]``, 0 at ignored tokens (whose rows come out exactly 0); ``ref_logits``, ``ref_lse`` and
    ``g_kl`` are ``None`` when the KL received no gradient, and the reference is then not read. A label outside
    ``[0, V)`` (another rank's column) adds no one-hot.

:func:`token_stats` runs them through the path's one autograd definition, the custom op ``dpo_kernels::logits_stats``
(with ``logits_stats_backward``), in eager mode and under ``torch.compile`` alike (:mod:`dpo_kernels.ops.custom_ops`):
it keeps ``lse`` (and ``ref_lse``) for the backward, skips the reference when the KL gets no gradient, and, in eager
mode with ``inplace_backward``, writes the gradient into the logits and marks them overwritten. The op has no host
sync (every token in place, no shape depends on the data), so a CUDA graph can capture it.

A vocabulary-parallel slice of the logits (``[R, T, V_r]`` on each rank of a group) runs ``fold`` and ``backward``
over its columns, the labels as columns of the slice: :func:`slice_forward` merges the named statistics across the
group (:func:`dpo_kernels.ops.vocab_parallel.combine`) and finishes them as the tile loop does
(:func:`dpo_kernels.ops.linear.loop.finish_forward`), :func:`slice_backward` hands ``backward`` the whole
vocabulary's ``lse`` (the Function of :mod:`dpo_kernels.ops.linear.recompute` carries both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import TokenOptions, statistics_dtype
from .custom_ops import EMPTY, dtypes, empty_or, options_args, present, refuse_double_backward, schema, split_args
from .inplace import mark_logits_overwritten
from .linear.contract import new_ref_stats, new_stats
from .linear.kept import KeptTokens
from .linear.loop import finish_forward
from .registry import backend_kernels
from .token_stats import TokenStats
from .vocab_parallel import VocabSlice


@dataclass(frozen=True)
class LogitsKernels:
    """A backend's from-logits row kernels (see the module docstring for their exact contract)."""

    forward: Callable[..., tuple]
    backward: Callable[..., None]
    fold: Callable[..., None]


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


def _kernels(backend: str, logits: Tensor, ref_logits: Tensor | None) -> LogitsKernels:
    return backend_kernels(backend, "torch.compile", logits, ref_logits).logits


def _forward_impl(*args) -> tuple[Tensor, ...]:
    (logits, ref_logits, labels, backend), opts = split_args(args, 4)
    logp, lse, ref_logp, ref_lse, kl = _kernels(backend, logits, ref_logits).forward(
        logits, ref_logits, labels.reshape(-1).contiguous(), opts)
    shape = tuple(labels.shape)
    per_token = [None if t is None else t.view(shape) for t in (logp, ref_logp, kl)]
    return tuple(empty_or(t, logp) for t in (*per_token, lse, ref_lse))


_logits_stats = torch.library.custom_op("dpo_kernels::logits_stats", _forward_impl, mutates_args=(),
                                        schema=schema("Tensor logits, Tensor? ref_logits, Tensor labels, str backend",
                                                      "(Tensor, Tensor, Tensor, Tensor, Tensor)"))


@_logits_stats.register_fake
def _(logits, ref_logits, labels, backend, *opts):
    _kernels(backend, logits, ref_logits)
    sdt = statistics_dtype(*dtypes(logits, ref_logits))
    per_token, flat = tuple(labels.shape), (labels.numel(),)
    ref_token, ref_flat = (per_token, flat) if ref_logits is not None else (EMPTY, EMPTY)
    return (labels.new_empty(per_token, dtype=sdt), labels.new_empty(ref_token, dtype=sdt),
            labels.new_empty(ref_token, dtype=sdt), labels.new_empty(flat, dtype=sdt),
            labels.new_empty(ref_flat, dtype=sdt))


def _write_grad(logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, backend, opts: TokenOptions, grad):
    flat = labels.reshape(-1).contiguous()
    g, g_kl = upstream_pair(grad_logp, grad_kl, flat, opts.ignore_index, lse.dtype)
    use_ref = g_kl is not None
    _kernels(backend, logits, ref_logits).backward(logits, ref_logits if use_ref else None, flat, lse,
                                                   ref_lse if use_ref else None, g, g_kl, opts, grad)
    return grad


def _backward_impl(*args) -> Tensor:
    (logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, backend), opts = split_args(args, 8)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _write_grad(logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, backend, opts, grad)


_logits_stats_backward = torch.library.custom_op(
    "dpo_kernels::logits_stats_backward", _backward_impl, mutates_args=(),
    schema=schema("Tensor logits, Tensor? ref_logits, Tensor labels, Tensor lse, Tensor? ref_lse, Tensor? grad_logp, "
                  "Tensor? grad_kl, str backend", "Tensor"))


@_logits_stats_backward.register_fake
def _(logits, *rest):
    return logits.new_empty(tuple(logits.shape))


_logits_stats.register_kernel("meta", _forward_impl)  # a trace on meta tensors sees the kernels, not fake outputs
_logits_stats_backward.register_kernel("meta", _backward_impl)


def _setup(ctx, inputs, output):
    logits, ref_logits, labels, backend, *opts = inputs
    logp, ref_logp, kl, lse, ref_lse = output
    ctx.set_materialize_grads(False)  # an unused KL output arrives as None: the reference is then not read
    ctx.mark_non_differentiable(ref_logp, lse, ref_lse)
    ctx.save_for_backward(logits, ref_logits, labels, lse, ref_lse)
    ctx.backend, ctx.opts = backend, opts
    ctx.with_ref = ref_logits is not None
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_logp, grad_ref_logp, grad_kl, grad_lse, grad_ref_lse):
    refuse_double_backward()
    logits, ref_logits, labels, lse, ref_lse = ctx.saved_tensors
    grad_kl = grad_kl if ctx.with_ref else None
    if (grad_logp is None and grad_kl is None) or not ctx.needs_input_grad[0]:
        return (None,) * ctx.num_inputs
    ref_lse = ref_lse if ctx.with_ref else None
    _, opts = split_args((ctx.backend, *ctx.opts), 1)
    if opts.inplace_backward:  # eager mode only (refused under torch.compile): the kernels write into the logits
        grad = _write_grad(logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, ctx.backend, opts, logits)
        mark_logits_overwritten(logits)
    else:
        grad = _logits_stats_backward(logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, ctx.backend,
                                      *ctx.opts)
    return (grad, *(None,) * (ctx.num_inputs - 1))


_logits_stats.register_autograd(_backward, setup_context=_setup)


def token_stats(logits: Tensor, ref_logits: Tensor | None, labels: Tensor, opts: TokenOptions,
                backend: str) -> TokenStats:
    """``logits [R, T, V]``, ``labels [R, T]`` -> :class:`TokenStats` ``[R, T]`` (with ``ref_logits``, which receives
    no gradient, the reference's log-probs and the KL too), on ``backend``'s row kernels."""
    outs = _logits_stats(logits, None if ref_logits is None else ref_logits.detach(), labels, backend,
                         *options_args(opts))
    return TokenStats(outs[0], present(outs[1]), present(outs[2]))


# --------------------------------------------------------------------------------------------- vocabulary slices


def slice_labels(labels: Tensor, vocab_slice: VocabSlice, vocab: int, ignore_index: int) -> Tensor:
    """Global labels ``[...]`` -> flat ``[N]`` columns of this rank's slice (``vocab`` wide): ``ignore_index`` kept,
    a label another rank holds mapped to a negative column that is not ``ignore_index`` (out of range: the kernels
    read nothing there and add no one-hot)."""
    flat = labels.reshape(-1)
    local = flat - vocab_slice.start
    elsewhere = -1 if ignore_index != -1 else -2
    local = torch.where((local >= 0) & (local < vocab), local, torch.full_like(local, elsewhere))
    return torch.where(flat == ignore_index, flat, local).contiguous()


def slice_forward(logits: Tensor, ref_logits: Tensor | None, labels: Tensor, opts: TokenOptions,
                  kernels: LogitsKernels, vocab_slice: VocabSlice) -> tuple[TokenStats, Tensor, Tensor | None]:
    """This rank's slice of the logits ``[R, T, V_r]`` (and of the reference's), global ``labels [R, T]`` ->
    ``(token_stats [R, T], lse [N], ref_lse [N] or None)``, the statistics equal on every rank of the group to one
    process with the whole logits; ``lse`` (the whole vocabulary's) is what :func:`slice_backward` needs."""
    vocab, ignore = logits.shape[-1], opts.ignore_index
    local = slice_labels(labels, vocab_slice, vocab, ignore)
    sdt = statistics_dtype(*dtypes(logits, ref_logits))
    stats = new_stats(local.numel(), sdt, logits.device)
    ref_stats = None if ref_logits is None else new_ref_stats(local.numel(), sdt, logits.device)
    kernels.fold(logits, ref_logits, local, opts, stats, ref_stats)
    every_token = KeptTokens(labels, ignore, vocab_slice.start, count=local.numel())
    out, lse, ref_lse = finish_forward(stats, ref_stats, every_token, labels.shape, vocab_slice, vocab, False)
    kept = labels != ignore
    return out.map(lambda t: torch.where(kept, t, torch.zeros((), dtype=t.dtype, device=t.device))), lse, ref_lse


def slice_backward(logits: Tensor, ref_logits: Tensor | None, labels: Tensor, lse: Tensor, ref_lse: Tensor | None,
                   grad_logp: Tensor | None, grad_kl: Tensor | None, opts: TokenOptions, kernels: LogitsKernels,
                   vocab_slice: VocabSlice) -> Tensor:
    """The gradient of this rank's slice of the logits from :func:`slice_forward`'s ``lse`` (and ``ref_lse``),
    written into the logits themselves with ``opts.inplace_backward``."""
    local = slice_labels(labels, vocab_slice, logits.shape[-1], opts.ignore_index)
    g, g_kl = upstream_pair(grad_logp, grad_kl, local, opts.ignore_index, lse.dtype)
    grad = logits if opts.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    use_ref = g_kl is not None
    kernels.backward(logits, ref_logits if use_ref else None, local, lse, ref_lse if use_ref else None, g, g_kl, opts,
                     grad)
    return grad
