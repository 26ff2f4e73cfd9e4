"""The eager schedule of the per-token functions from hidden states: ``schedule="eager"`` (or ``"auto"``, where it
is estimated faster) on :func:`dpo_kernels.linear_token_logprobs` and :func:`dpo_kernels.linear_token_logprobs_and_kl`,
and ``patch(schedule=...)`` under TRL's trainers.

A per-token function learns its upstream gradient only in the backward, so the recompute schedule runs a trainable
head's GEMM twice: in the forward, and again in the backward before ``dH`` and ``dW`` (``8 n D V`` FLOPs). This
schedule keeps what ``dZ`` needs of each tile in the forward, as ``fused_dpo_loss``'s eager schedule does over one
group (:mod:`.eager`): with bf16 GEMM operands each tile's softmax weights in fp16, 2 bytes a logit (4 with the
reference's, where the KL may receive a gradient), in the weight gradient's memory as far as it goes (allocated by
the forward; :class:`~.sources.StorePlacement`) and beside it within ``eager_budget_mb``, the vocabulary chunks that
do not fit recomputed; otherwise (fp32 or fp16 operands, the CPU) the fp32 tiles themselves, 4 bytes a logit, which
must fit the budget whole. The backward forms ``dZ`` from them with the upstream gradient, then ``dH``, ``dW`` and
``db``: ``6 n D V`` FLOPs for the policy (one GEMM a pass fewer).

What it holds: the store, from the forward until the backward (a second backward through the same outputs,
``retain_graph=True``, is refused: the backward writes ``dW`` over the store). ``auto`` runs it only on an
accelerator, for a trainable head, with bf16 operands (the scaled store), outside ``torch.compile``, where
:func:`.eager.estimated_slower` finds it faster (a ZeRO-3 head is gathered again around the backward's reads of it,
as for the recompute schedule); elsewhere the recompute schedule (for a frozen head that one forms the hidden
states' gradient in its forward, with no backward GEMM at all).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ...options import statistics_dtype
from ..common import LinearHead
from ..token_stats import TokenStats
from ..vocab_parallel import all_reduce_hidden_grad
from . import plan as plans  # the store rule through the module: tests may force it
from .eager import EagerNeed, PairGroups, estimated_slower, kept_forward
from .kept import KeptTokens
from .loop import Backward, ForwardState, grad_all, linear_backward, no_autocast, upstream
from .products import Products

_log = logging.getLogger("dpo_kernels")


@dataclass
class StoredPass:
    """What the forward keeps for the backward: the kept tokens, the policy's source over its store (filled), the
    reference's stored tiles (fp32 tiles with a KL gradient) or ``None``, the backward's tile plan, the weight's
    gradient that holds part of a scaled store (``None`` otherwise), whether the store holds the reference's side of
    the KL gradient, and the forward's state (``lse``, options, kernels, heads: a KL gradient the store does not
    hold is recomputed from it)."""

    rows: KeptTokens
    policy: object
    ref: object | None
    plan: object
    dw: torch.Tensor | None
    kl_kept: bool
    state: ForwardState
    reads_hidden: bool  # the backward may recompute a KL gradient from the hidden states (see saved_hidden)

    def saved_hidden(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """What the autograd Function saves of ``hidden`` for :func:`backward`: ``hidden`` where the backward may read
        it, or where the store's kept rows are its own memory (held anyway: saved, autograd checks that nothing
        modified it in place); else ``None``, so that hidden states made for this call (a caller's gather of the
        kept tokens, fp32 under autocast) are not held until the backward, which reads its own converted copy."""
        def root(t: torch.Tensor) -> torch.Tensor:
            return t if t._base is None else t._base

        return hidden if self.reads_hidden or root(self.policy.h) is root(hidden) else None


def plan(call, hidden, weight, bias, labels, ref: LinearHead | None, products: Products,
         ref_products: Products | None, need: tuple[bool, bool, bool]) -> tuple[PairGroups | str, KeptTokens | None]:
    """``(the store's one group, the kept tokens)`` for this call, or ``(why the eager schedule cannot, or under
    ``auto`` should not, run here, the kept tokens if they were found)``."""
    why = _declined(call, hidden, weight, ref, products, need)
    if why:
        return why, None
    offset = 0 if call.vocab_slice is None else call.vocab_slice.start
    rows = KeptTokens(labels, call.opts.ignore_index, offset, call.kept_count)
    return _groups(call, hidden, weight, bias, ref, products, ref_products, rows, need), rows


def _declined(call, hidden, weight, ref: LinearHead | None, products: Products, need) -> str | None:
    """Why not, from the call alone (before the kept tokens are counted)."""
    if call.schedule == "recompute":
        return "schedule='recompute'"
    if not (need[1] or need[2]):
        return "the head is frozen: the recompute schedule forms the hidden states' gradient in its forward"
    device = hidden.device
    heads = [(hidden, weight)] + ([] if ref is None else [(ref.hidden, ref.weight)])
    sdt = statistics_dtype(*(t.dtype for pair in heads for t in pair))
    store_dtype = plans.kept_store_dtype(products.operand_dtype, sdt, call.opts)
    if call.schedule == "auto" and not plans.estimates_cost(device):
        return "on the CPU auto keeps the per-token functions' recompute schedule"
    if call.schedule == "auto" and store_dtype == sdt:
        return (f"the store would keep the {str(sdt).removeprefix('torch.')} tiles themselves (GEMM operands "
                f"{str(products.operand_dtype).removeprefix('torch.')}): auto keeps one only for bf16 operands")
    return None


def _groups(call, hidden, weight, bias, ref: LinearHead | None, products: Products, ref_products: Products | None,
            rows: KeptTokens, need) -> PairGroups | str:
    """The store's one group within the budget, or why not (or, under ``auto``, why it is estimated slower)."""
    device = hidden.device
    heads = [(hidden, weight)] + ([] if ref is None else [(ref.hidden, ref.weight)])
    sdt = statistics_dtype(*(t.dtype for pair in heads for t in pair))
    store_dtype = plans.kept_store_dtype(products.operand_dtype, sdt, call.opts)
    converted = [products.converted_bytes(weight)] + ([] if ref is None else [ref_products.converted_bytes(ref.weight)])
    vocab = weight.shape[0] if call.vocab_slice is None else call.vocab_slice.largest
    eager_need = EagerNeed([rows.n, 0], vocab, weight.shape[1], sdt,
                           keep_ref_tiles=ref is not None and call.kl_grad, half_weight_grad=False,
                           converted_bytes=sum(converted), store_dtype=store_dtype,
                           grad_itemsize=weight.element_size() if need[1] else 0,
                           policy_converted_bytes=converted[0])
    groups = eager_need.groups(eager_need.budget_bytes(call.eager_budget_mb, device))
    if isinstance(groups, str):
        return groups
    if call.schedule == "auto":
        linear_heads = [LinearHead(hidden, weight, bias)] + ([] if ref is None else [ref])
        why = estimated_slower(eager_need, groups, linear_heads, converted, sdt, call.opts, "dpo_kernels")
        if why:
            return why
    return groups


def forward(hidden, weight, bias, labels, ref: LinearHead | None, products: Products, ref_products, call,
            rows: KeptTokens, groups: PairGroups, need: tuple[bool, bool, bool]) -> tuple[TokenStats, StoredPass]:
    """The forward over ``groups``' store: ``(token_stats, stored)``; ``stored`` is what :func:`backward` reads."""
    sdt = products.out_dtype
    scaled = plans.kept_store_dtype(products.operand_dtype, sdt, call.opts) != sdt
    kl_kept = ref is not None and call.kl_grad
    dw = None
    if scaled and need[1]:  # the weight's gradient, allocated now: its memory holds the store's first chunks
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=hidden.device)
    kept = kept_forward(LinearHead(hidden, weight, bias), ref, rows, labels.shape, products, ref_products, call.opts,
                        call.kernels, call.logging, call.vocab_slice, scaled=scaled, keep_ref=kl_kept,
                        with_kl=call.with_kl or kl_kept, dw=dw, store_room=groups.store_room,
                        log_as="dpo_kernels: the per-token eager schedule's scaled store")
    # a scaled store keeps the reference's weights itself (a KL gradient); fp32 tiles keep the reference's beside
    ref_filled = kept.ref.filled() if kl_kept and not scaled else None
    state = ForwardState(rows, kept.lse, kept.ref_lse, call.opts, call.kernels, ref, products, ref_products,
                         call.vocab_slice)
    reads_hidden = ref is not None and call.with_kl and not kl_kept
    return kept.out, StoredPass(rows, kept.filled_policy(), ref_filled, kept.backward_plan, dw, kl_kept, state,
                                reads_hidden)


def backward(hidden, weight, bias, stored: StoredPass, grad_logp, grad_kl, need: tuple[bool, bool, bool],
             like: tuple, head_context=None):
    """``(dhidden of ``like``, the hidden states' ``(shape, dtype)``, dweight like weight, dbias like bias)`` from
    the store, ``None`` for a gradient not in ``need``; a KL gradient the store does not hold (the caller said the KL
    would get none) is added by the recompute schedule's backward, from ``hidden`` (what
    :meth:`StoredPass.saved_hidden` kept; ``None`` where the backward never reads it). ``head_context(weight, bias)``: entered around the backward's reads of the head
    (``dH``'s GEMMs, the chunks not kept), as the recompute schedule's backward does (a ZeRO-3 gather)."""
    state, rows = stored.state, stored.rows
    device, sdt = state.lse.device, state.products.out_dtype
    g, g_kl = upstream(rows, grad_logp, grad_kl if stored.kl_kept else None, sdt, device)
    gathered = contextlib.nullcontext() if head_context is None else head_context(weight, bias)
    with no_autocast(device), gathered:
        bw = Backward(state.lse, state.ref_lse, g, g_kl, state.opts, state.kernels)
        dh, dw, db = grad_all(rows, stored.policy, stored.ref if g_kl is not None else None, bw, need, stored.plan,
                              dw_out=stored.dw)
    if dh is not None and state.vocab_slice is not None:
        all_reduce_hidden_grad(dh, state.vocab_slice.group)
    dh = None if dh is None else rows.scatter(dh, *like)
    db = None if db is None else db.to(bias.dtype)
    if grad_kl is not None and not stored.kl_kept:
        extra = linear_backward(hidden, weight, bias, state, None, grad_kl, need, head_context)
        dh, dw, db = (b if a is None else a if b is None else a + b for a, b in zip((dh, dw, db), extra))
    return dh, dw, db
