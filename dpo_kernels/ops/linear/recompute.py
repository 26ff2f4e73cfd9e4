"""The recompute schedule's two entries over the same passes (:func:`.loop.linear_forward` /
:func:`.loop.linear_backward`): one custom op for ``torch.compile``, one Function for eager mode.

:func:`loop_stats` (:class:`_LoopStats`) is eager mode's: from hidden states and a head (optionally a reference
head), and for a vocabulary-parallel slice of given logits (over the row kernels,
:func:`dpo_kernels.ops.logits_path.slice_forward`); it takes what an op cannot: a vocabulary split over a
process group (collectives in both passes, :mod:`dpo_kernels.ops.vocab_parallel`), a context that gathers a sharded
head again for the backward (ZeRO-3, ``head_context``), the statistics trainers log, and the kept-token count of the
caller's one host read. It is a Function rather than the op because an op is one opaque node to a
``TorchDispatchMode``: the FLOP and host-sync counts of the tests, the GEMM operand check of ``gpu_check`` and the
roofline model's traces see the GEMMs and tile launches inside this Function, and would see none inside the op.

:func:`linear_stats` (``dpo_kernels::linear_stats`` with ``linear_stats_backward``) is the compiled path's: one
opaque node with static output shapes to the compiler. Outputs: ``logp``, ``ref_logp``, ``kl`` ``[R, T]``, ``lse``
and ``ref_lse`` ``[R*T]`` (scattered to every token, 0 where ignored, so the backward finds the kept tokens again
from the labels), and for a frozen head (``frozen_head``, decided when traced) ``J`` and ``K`` ``[R*T, D]``, the
hidden states' gradient formed in the forward (:func:`.loop.hidden_grads`; the backward is then a per-token scale);
what a call lacks is an empty tensor. The products' dtype is decided before the op, under the caller's autocast
state (``compute_dtype``), as the loop would decide it.

CUDA graphs (``mode="reduce-overhead"``): the op cannot be captured: it drops the ignored tokens before the first
GEMM, and without ``kept_count`` how many are kept is read on the host, which a stream capture does not allow; it
raises saying so instead of failing inside the capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ...options import TokenOptions, statistics_dtype
from ..common import LinearHead, first_order_only
from ..custom_ops import (
    EMPTY,
    raise_value_error,
    dtypes,
    empty_or,
    options_args,
    present,
    refuse_double_backward,
    schema,
    split_args,
)
from ..inplace import mark_logits_overwritten, refuse_leaf_logits
from ..logits_path import LogitsKernels, slice_backward, slice_forward
from ..registry import backend_kernels
from ..token_stats import TokenStats
from ..vocab_parallel import VocabSlice
from . import stored
from .contract import LOGGED_OUTPUTS, TileKernels
from .kept import KeptTokens
from .loop import (
    ForwardState,
    formed_hidden_grads,
    frozen_head_backward,
    head_products,
    linear_backward,
    linear_forward,
)
from .products import product_dtype

_log = logging.getLogger("dpo_kernels")

_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_TENSORS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, "
            "Tensor labels")
_OWN = "ScalarType compute_dtype, ScalarType ref_compute_dtype, str backend, bool frozen_head"


def _refuse_graph_capture(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "dpo_kernels' compiled linear path cannot be captured in a CUDA graph: it reads on the host how many "
            "tokens are kept (a sync) before it plans its tiles. Compile without CUDA graphs (mode='default' or "
            "'max-autotune-no-cudagraphs'), or pass logits, whose compiled ops have no host sync")


def _op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, compute, backend):
    """What both passes rebuild from the op's arguments: ``(ref head or None, products, ref products, tile
    kernels)``."""
    ref = None if ref_hidden is None else LinearHead(ref_hidden, ref_weight, ref_bias)
    products, ref_products = head_products(hidden, weight, ref, compute)
    kernels = backend_kernels(backend, "torch.compile", hidden, weight, bias, ref_hidden, ref_weight, ref_bias).tiles
    return ref, products, ref_products, kernels


def _forward_impl(*args) -> tuple[Tensor, ...]:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cdt, ref_cdt, backend,
     frozen), opts = split_args(args, 11)
    _refuse_graph_capture(hidden.device)
    ref, products, ref_products, kernels = _op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                      (cdt, ref_cdt), backend)
    out, state = linear_forward(hidden, weight, bias, labels, ref, products, ref_products, opts, kernels,
                                frozen_head=(frozen, True))
    flat, rows = (labels.numel(),), state.rows
    lse = rows.scatter(state.lse, flat, state.lse.dtype)
    ref_lse = None if state.ref_lse is None else rows.scatter(state.ref_lse, flat, state.ref_lse.dtype)
    j = k = None  # a frozen head's dH/dlogp and dH/dKL, at every token (0 where ignored) for static shapes
    if state.hidden_grads is not None:
        wide = (labels.numel(), hidden.shape[-1])
        j, k = (None if t is None else rows.scatter(t, wide, t.dtype) for t in state.hidden_grads)
    return tuple(empty_or(t, out.logp) for t in (out.logp, out.ref_logp, out.kl, lse, ref_lse, j, k))


_linear_stats = torch.library.custom_op("dpo_kernels::linear_stats", _forward_impl, mutates_args=(),
                                        schema=schema(f"{_TENSORS}, {_OWN}", _OUTPUTS))


@_linear_stats.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, compute_dtype, ref_compute_dtype, backend,
      frozen_head, *opts):
    backend_kernels(backend, "torch.compile", hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    sdt = statistics_dtype(*dtypes(hidden, weight, ref_hidden, ref_weight))
    per_token, flat = tuple(labels.shape), (labels.numel(),)
    ref_token, ref_flat = (per_token, flat) if ref_hidden is not None else (EMPTY, EMPTY)
    wide = (labels.numel(), hidden.shape[-1])
    j, k = (wide if frozen_head else EMPTY), (wide if frozen_head and ref_hidden is not None else EMPTY)
    return (labels.new_empty(per_token, dtype=sdt), labels.new_empty(ref_token, dtype=sdt),
            labels.new_empty(ref_token, dtype=sdt), labels.new_empty(flat, dtype=sdt),
            labels.new_empty(ref_flat, dtype=sdt), labels.new_empty(j, dtype=sdt), labels.new_empty(k, dtype=sdt))


def _backward_impl(*args) -> tuple[Tensor, Tensor, Tensor]:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, grad_logp, grad_kl, need_hidden,
     need_weight, need_bias, cdt, ref_cdt, backend), opts = split_args(args, 17)
    _refuse_graph_capture(hidden.device)
    ref, products, ref_products, kernels = _op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                      (cdt, ref_cdt), backend)
    rows = KeptTokens(labels, opts.ignore_index)
    sdt = products.out_dtype
    state = ForwardState(rows, rows.select(lse, sdt), None if ref_lse is None else rows.select(ref_lse, sdt),
                         opts, kernels, ref, products, ref_products)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    dh, dw, db = linear_backward(hidden, weight, bias, state, grad_logp, grad_kl, need)
    return empty_or(dh, hidden), empty_or(dw, weight), empty_or(db, weight)


_linear_stats_backward = torch.library.custom_op(
    "dpo_kernels::linear_stats_backward", _backward_impl, mutates_args=(),
    schema=schema(f"{_TENSORS}, Tensor lse, Tensor? ref_lse, Tensor? grad_logp, Tensor? grad_kl, bool need_hidden, "
                  "bool need_weight, bool need_bias, ScalarType compute_dtype, ScalarType ref_compute_dtype, "
                  "str backend", "(Tensor, Tensor, Tensor)"))


@_linear_stats_backward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, grad_logp, grad_kl, need_hidden,
      need_weight, need_bias, *rest):
    return (hidden.new_empty(tuple(hidden.shape) if need_hidden else EMPTY),
            weight.new_empty(tuple(weight.shape) if need_weight else EMPTY),
            weight.new_empty(EMPTY) if bias is None or not need_bias else bias.new_empty(tuple(bias.shape)))


def _setup(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cdt, rcdt, backend, frozen, *opts = inputs
    logp, ref_logp, kl, lse, ref_lse, j, k = output
    ctx.set_materialize_grads(False)  # an unused KL's gradient arrives as None: the reference is then not recomputed
    ctx.mark_non_differentiable(ref_logp, lse, ref_lse, j, k)
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, j, k)
    ctx.args = (cdt, rcdt, backend, *opts)
    ctx.with_ref, ctx.frozen = ref_hidden is not None, frozen
    ctx.ignore_index = split_args(tuple(opts), 0)[1].ignore_index
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_logp, grad_ref_logp, grad_kl, grad_lse, grad_ref_lse, grad_j, grad_k):
    refuse_double_backward()
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, j, k = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grad_kl = grad_kl if ctx.with_ref else None
    if (grad_logp is None and grad_kl is None) or not any(need):
        return (None,) * ctx.num_inputs
    if ctx.frozen:  # the forward formed dH: a per-token scale (0 at ignored tokens, whatever the upstream holds)
        kept = (labels != ctx.ignore_index).reshape(-1, 1)
        dh = torch.zeros_like(j)
        if grad_logp is not None:
            dh = dh + torch.where(kept, j * grad_logp.reshape(-1, 1).to(j.dtype), 0.0)
        if grad_kl is not None:
            dh = dh + torch.where(kept, k * grad_kl.reshape(-1, 1).to(k.dtype), 0.0)
        return (dh.view(hidden.shape).to(hidden.dtype), *(None,) * (ctx.num_inputs - 1))
    dh, dw, db = _linear_stats_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse,
                                        ref_lse if ctx.with_ref else None, grad_logp, grad_kl, *need, *ctx.args)
    grads = (dh if need[0] else None, dw if need[1] else None, db if need[2] and bias is not None else None)
    return (*grads, *(None,) * (ctx.num_inputs - len(grads)))


_linear_stats.register_autograd(_backward, setup_context=_setup)


def linear_stats(policy: LinearHead, ref: LinearHead | None, labels: Tensor, opts: TokenOptions,
                 backend: str) -> TokenStats:
    """The compiled path: ``policy.hidden [R, T, D]``, ``policy.weight [V, D]``, ``labels [R, T]`` (and the reference
    head beside, ``[R, T, D_ref]``, ``[V, D_ref]``) -> :class:`TokenStats` ``[R, T]`` through the op, on
    ``backend``'s tile kernels; only the policy receives gradients."""
    cdt = product_dtype(policy.hidden, policy.weight)  # under the caller's autocast: the op runs outside it
    ref_cdt = cdt if ref is None else product_dtype(ref.hidden, ref.weight)
    ref_args = (None, None, None) if ref is None else (ref.hidden.detach(), ref.weight.detach(),
                                                       None if ref.bias is None else ref.bias.detach())
    # a frozen head (decided when traced: requires_grad is static) forms dH in the forward, as in eager mode
    frozen = (torch.is_grad_enabled() and policy.hidden.requires_grad and not policy.weight.requires_grad
              and not (policy.bias is not None and policy.bias.requires_grad))
    outs = _linear_stats(policy.hidden, policy.weight, policy.bias, *ref_args, labels, cdt, ref_cdt, backend, frozen,
                         *options_args(opts))
    return TokenStats(outs[0], present(outs[1]), present(outs[2]))


# --------------------------------------------------------------------------------------------- eager mode


@dataclass(frozen=True)
class LoopCall:
    """The non-tensor arguments of one eager-mode call: options, the backend's kernels (tile kernels for a head, row
    kernels for logits), whether the logged statistics are folded, the vocabulary slice, a head-gathering context,
    the kept-token count of the caller's host read, whether the KL may receive a gradient (``kl_grad``: a frozen
    head then prepares the KL's gradient in the forward too), and whether the caller wants the KL at all
    (``with_kl``; without it no KL is computed or returned, :func:`.loop.fold_all`), and the schedule of a
    trainable head with its budget (:mod:`.stored`)."""

    opts: TokenOptions
    kernels: TileKernels | LogitsKernels
    logging: bool = False
    vocab_slice: VocabSlice | None = None
    head_context: object = None
    kept_count: int | None = None
    kl_grad: bool = True
    with_kl: bool = True
    schedule: str = "recompute"  # or "eager" / "auto": a trainable head's store kept for the backward (.stored)
    eager_budget_mb: float | None = None


class _LoopStats(torch.autograd.Function):
    """The recompute passes in eager mode: ``source`` is ``"linear"`` (``a, b, c`` = hidden, weight, bias) or
    ``"logits"`` (``a`` = this rank's slice of the logits, :func:`dpo_kernels.ops.logits_path.slice_forward`). A head
    that needs no gradient while the hidden states do (LoRA, a frozen output layer) takes the frozen-head forward
    (:func:`.loop.hidden_grads`): its backward is a per-token scale, with no GEMM and no use of the head. A trainable
    head under ``call.schedule`` ``"eager"`` (or ``"auto"`` where :func:`.stored.plan` takes it) keeps its tiles for
    the backward instead of recomputing them (:mod:`.stored`)."""

    @staticmethod
    def forward(ctx, source: str, a, b, c, labels, ref, call: LoopCall):
        ctx.set_materialize_grads(False)  # an unused output (the KL) then arrives as None in the backward
        opts = call.opts
        ctx.stored, ctx.was_stored = None, False
        if source == "linear":
            products, ref_products = head_products(a, b, ref)
            need = ctx.needs_input_grad
            frozen = need[1] and not need[2] and not (c is not None and need[3])
            grads = (need[1], need[2], need[3] and c is not None)
            kept_count = call.kept_count
            if call.schedule != "recompute" and any(grads) and not frozen:
                groups, rows = stored.plan(call, a, b, c, labels, ref, products, ref_products, grads)
                kept_count = kept_count if rows is None else rows.n  # one host read, whichever schedule runs
                if isinstance(groups, str):
                    if call.schedule == "eager":
                        raise_value_error(f"schedule='eager' cannot run here: {groups}; use schedule='auto' or "
                                          "'recompute'", labels)
                    _log.debug("dpo_kernels: per-token recompute schedule (%s)", groups)
                else:
                    out, ctx.stored = stored.forward(a, b, c, labels, ref, products, ref_products, call, rows,
                                                     groups, grads)
                    ctx.was_stored = True
            if not ctx.was_stored:
                out, ctx.state = linear_forward(a, b, c, labels, ref, products, ref_products, opts, call.kernels,
                                                call.logging, call.vocab_slice, kept_count,
                                                (frozen, call.kl_grad), call.with_kl)
            # saved only where the backward reads them: a caller's gather of the kept tokens is not held until then
            if ctx.was_stored:
                saved = ctx.stored.saved_hidden(a)
            else:
                saved = None if formed_hidden_grads(ctx.state, ref is not None and call.with_kl) else a
            ctx.hidden_like = (a.shape, a.dtype)
            ctx.save_for_backward(saved, b, c)
        else:
            if opts.inplace_backward:
                refuse_leaf_logits(a)
            out, lse, ref_lse = slice_forward(a, ref, labels, opts, call.kernels, call.vocab_slice)
            ctx.save_for_backward(a, ref, labels, lse, ref_lse)
        ctx.source, ctx.call, ctx.with_ref = source, call, ref is not None
        frozen_outputs = [t for t in (out.ref_logp, *(out.logged or {}).values()) if t is not None]
        if frozen_outputs:
            ctx.mark_non_differentiable(*frozen_outputs)
        outs = (out.logp, out.ref_logp, out.kl, *(out.logged or {}).values())
        return tuple(t for t in outs if t is not None)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, *grad_rest):
        grad_kl = grad_rest[1] if ctx.with_ref and ctx.call.with_kl else None
        nothing = (None,) * 7
        if grad_logp is None and grad_kl is None:
            return nothing
        call = ctx.call
        if ctx.source == "logits":
            logits, ref_logits, labels, lse, ref_lse = ctx.saved_tensors
            grad = slice_backward(logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, call.opts,
                                  call.kernels, call.vocab_slice)
            if call.opts.inplace_backward:
                mark_logits_overwritten(logits)
            return (None, grad, *nothing[2:])
        a, b, c = ctx.saved_tensors
        need = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3] and c is not None)
        if not any(need):
            return nothing
        if ctx.was_stored:
            if ctx.stored is None:
                raise RuntimeError("the eager schedule of dpo_kernels' per-token functions hands its gradients out "
                                   "once (the backward writes the weight's gradient over the store): "
                                   "backpropagating through the same log-probs twice (retain_graph=True) needs "
                                   "schedule='recompute'")
            kept, ctx.stored = ctx.stored, None
            return (None, *stored.backward(a, b, c, kept, grad_logp, grad_kl, need, ctx.hidden_like,
                                           call.head_context), *nothing[4:])
        if a is None:  # a frozen head's forward formed every gradient (formed_hidden_grads)
            return (None, frozen_head_backward(ctx.state, grad_logp, grad_kl, ctx.hidden_like), *nothing[2:])
        return (None, *linear_backward(a, b, c, ctx.state, grad_logp, grad_kl, need, call.head_context),
                *nothing[4:])


def loop_stats(source: str, tensors: tuple, labels: Tensor, ref, call: LoopCall) -> TokenStats:
    """:class:`_LoopStats` over ``tensors`` (``(hidden, weight, bias)`` with tile kernels, or ``(logits,)`` with row
    kernels; ``ref`` a :class:`LinearHead` or the reference's logits) -> :class:`TokenStats` ``[R, T]``."""
    a, b, c = (*tensors, None, None)[:3]
    if isinstance(ref, LinearHead):
        ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    elif ref is not None:
        ref = ref.detach()
    outs = list(_LoopStats.apply(source, a, b, c, labels, ref, call))
    logp = outs.pop(0)
    ref_logp = outs.pop(0) if ref is not None else None
    kl = outs.pop(0) if ref is not None and call.with_kl else None
    return TokenStats(logp, ref_logp, kl, dict(zip(LOGGED_OUTPUTS, outs, strict=True)) if call.logging else None)
