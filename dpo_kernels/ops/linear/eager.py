"""The eager schedule of the fused objectives from hidden states: what the policy's gradients need kept from the
forward, so that no tile is recomputed.

Inside :func:`dpo_kernels.fused_dpo_loss` the loss is computed in the same call as the log-probs, so once the forward
over a group of **whole pairs** (rows ``b`` and ``b + B`` of the ``2B`` rows, with their reference) is done, the
gradient of the loss with respect to each of their tokens' log-probs and KL is known. This schedule keeps the
group's tiles from the forward and forms ``dZ``, ``dH`` and ``dW`` from them through the one tile loop of
:mod:`.loop` (its stored sources read the kept tiles back instead of recomputing them):

- bf16 GEMM operands (an accelerator under bf16 autocast, a bf16 model): every pair in one group, each logit kept as
  its softmax weight in fp16 with the exact label logit (:class:`~.sources.ScaledSource`,
  :func:`~.plan.kept_store_dtype`), ``2 V`` bytes a kept token, ``4 V`` for TDPO; the forward folds and computes
  the loss and its per-token upstream (autograd over the ``[2B, T]`` statistics), and the backward forms ``dZ``
  once with the loss's upstream scale inside, then ``dH``, ``dW`` and ``db`` (:class:`_DeferredGrads`). The store
  lies in the weight's gradient, allocated by the forward, as far as it goes (each chunk at or after its own rows,
  which the backward writes after reading it: :class:`~.sources.StorePlacement`), with the policy's head rows
  converted once for the call in what the store leaves of it; ``eager_budget_mb`` bounds what lies beside the
  gradient (by default nothing beside an fp32 master weight's, :meth:`EagerNeed.budget_bytes`),
  and a store larger than that keeps the vocabulary chunks that fit; the backward recomputes the others as the
  recompute schedule does;
- otherwise (fp32 or fp16 operands, the CPU, ``grad_filter_eps``): per group, one GEMM per tile into the group's
  :class:`~.sources.TileStore` (the GEMM output, bit-identical to what the recompute schedule would recompute,
  ``4 V`` bytes a token, ``8 V`` for fp64, twice that for TDPO, whose KL gradient reads the reference's),
  ``kernels.fold``, the statistics, the group's loss and upstream, then ``kernels.grad`` over the kept tiles,
  ``dH`` (fp32 accumulator) and ``dW`` (fp32 accumulation inside the GEMMs); the backward scales what the forward
  computed by the loss's upstream gradient (gradient accumulation, loss weights, a GradScaler). From the forward to
  the backward it holds the fp32 ``dH [n, D]`` and ``dW`` (which the recompute schedule allocates in the backward,
  while the same activations are alive);
- a gradient that reaches the returned per-token log-probs or KL from outside the loss is exact: it runs the
  recompute backward of :mod:`.loop` for that part alone.

FLOPs at ``n`` kept tokens, head ``[V, D]``: ``6 n D V`` for the policy (forward, ``dH``, ``dW``; ``4 n D V`` with a
frozen head) plus ``2 n D V`` for the reference, against ``8 + 2`` for the recompute schedule (``8 + 4`` for TDPO,
which recomputes the reference in the backward); a partial store adds back the recompute of the chunks it does not
keep. Memory: the store beside the weight gradient within ``eager_budget_mb`` (:mod:`.plan`).

The weight gradient keeps the recompute schedule's rule: fp32 accumulation inside the GEMMs, never a half-precision
accumulation across groups, and one rounding to the weight's dtype after the loss's upstream scale is applied. Over
one group of a scaled store every gradient is left to the backward (:class:`_DeferredGrads`): the group's kept
weights stay alive until then, and the backward forms ``dZ`` from them once, with the upstream scale inside its one
rounding, then ``dH``, each chunk's ``dW`` with one GEMM and one rounding (fp32 or half alike) and ``db``: the
forward runs no ``dZ`` pass, no ``[V, D]`` buffer is held, and none is scaled afterwards (``4 n D V`` FLOPs moved to
the backward, not added). Otherwise an fp32 weight (fp32 master weights under autocast) accumulates every group
straight into its fp32 gradient, scaled in place in the backward; a half weight over several groups takes an fp32
``[V, D]`` accumulator counted against the budget (or, when it does not fit, the recompute schedule), which the
backward scales and rounds in one pass. There the ``dZ`` operands of ``dH`` (and of an accumulated ``dW``) are
rounded to the half operand dtype before the upstream scale is known (the recompute schedule rounds them after).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...options import TokenOptions
from ...validation import is_finite_number
from ..common import LinearHead, first_order_only
from ..token_stats import TokenStats
from ..vocab_parallel import VocabSlice, all_reduce_hidden_grad
from . import cost
from .contract import LOGGED_OUTPUTS, TileKernels
from .kept import KeptTokens
from .loop import (
    Backward,
    ForwardState,
    finish_forward,
    fold_all,
    grad_all,
    head_products,
    linear_backward,
    no_autocast,
    tile_plan,
    upstream,
)
from . import plan as plans  # the store rule through the module: tests may force it
from .plan import eager_budget_bytes, plan_stored_backward, scaled_store_bytes_per_token
from .sources import GemmSource, ScaledSource, StoredSource, operand_head

_log = logging.getLogger("dpo_kernels")

# (rows [2B_g] of the batch, token logps [2B_g, T], ref logps or None, kl or None, logged dict or None) -> the loss
# of those pairs as a part of the batch's loss (already weighted by B_g / B)
GroupLoss = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict | None],
                     torch.Tensor]


@dataclass(frozen=True)
class PairGroups:
    """Pairs ``[b0, b1)`` of ``pairs`` (rows ``b0:b1`` and ``B + b0:B + b1``), each group's kept tiles within the
    budget; ``tokens``: each group's kept tokens; ``spare_bytes``: what the budget leaves beside the largest group's
    tiles and the weight-gradient accumulator (room for heads converted once for the call). A scaled store (one
    group) has ``store_room``: the bytes it may allocate beside the weight gradient's memory for its chunks;
    ``operand_share``: about the share of the policy's converted rows the gradient's memory holds after the store
    (those are converted once a call, the others by the forward and again by the backward); and, where it is larger
    than the budget, ``store_vocab``: about how many columns it keeps (whole vocabulary chunks,
    :meth:`.sources.ScaledSource.keep`; the backward recomputes the others)."""

    pairs: int
    bounds: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]  # kept tokens of each group
    spare_bytes: int = 0
    store_vocab: int | None = None  # a scaled store's columns within the budget (one group), None: every column
    store_room: int | None = None  # a scaled store's bytes beside the weight gradient's memory
    operand_share: float = 0.0  # a scaled store: the policy's converted rows kept in the gradient's memory

    @property
    def largest_group(self) -> int:
        return max(self.tokens, default=0)

    @property
    def kept(self) -> int:
        return sum(self.tokens)

    def rows(self, b0: int, b1: int, device: torch.device) -> torch.Tensor | None:
        """The batch rows of pairs ``b0:b1`` (chosen first), ``None`` for the whole batch."""
        if (b0, b1) == (0, self.pairs):
            return None
        chosen = torch.arange(b0, b1, device=device)
        return torch.cat([chosen, chosen + self.pairs])


def plan_pair_groups(tokens_per_pair: list[int], bytes_per_token: int, budget_bytes: int,
                     weight_accumulator_bytes: int, converted_bytes: int = 0) -> PairGroups | str:
    """Consecutive pairs, greedily, as many per group as the budget holds; or why the eager schedule cannot run.

    ``tokens_per_pair``: kept tokens of each pair (both responses); ``bytes_per_token``: kept-tile bytes per token;
    ``weight_accumulator_bytes``: the fp32 ``[V, D]`` buffer a half weight's gradient is accumulated in across
    several groups until the backward scales it by the loss's upstream and rounds it once (0: none needed), counted
    against the budget (a scaled store is planned by :meth:`EagerNeed.groups` instead);
    ``converted_bytes``: the heads converted to their GEMM operands once for the call, reserved beside the tiles
    when the largest pair still fits (else the heads are converted chunk by chunk, and the groups use the room)."""
    largest = max(tokens_per_pair, default=0) * bytes_per_token
    if largest > budget_bytes:
        return f"one pair's kept tiles need {_mib(largest)}, more than eager_budget_mb={_mib(budget_bytes)}"
    room = budget_bytes - weight_accumulator_bytes
    if largest > room:
        return (f"the fp32 weight-gradient accumulator ({_mib(weight_accumulator_bytes)}) leaves {_mib(max(room, 0))} "
                f"of eager_budget_mb={_mib(budget_bytes)} for a pair's {_mib(largest)} of tiles")
    full_room = room
    if largest <= room - converted_bytes:
        room -= converted_bytes
    bounds, start, used = [], 0, 0
    for b, tokens in enumerate(tokens_per_pair):
        if used and used + tokens * bytes_per_token > room:
            bounds.append((start, b))
            start, used = b, 0
        used += tokens * bytes_per_token
    bounds.append((start, len(tokens_per_pair)))
    tokens = tuple(sum(tokens_per_pair[b0:b1]) for b0, b1 in bounds)
    return PairGroups(len(tokens_per_pair), tuple(bounds), tokens, full_room - max(tokens) * bytes_per_token)


@dataclass(frozen=True)
class EagerNeed:
    """What the eager schedule keeps for a batch: ``kept_per_row`` (``2B`` rows, chosen first), a head of
    ``vocab x dim``, statistics in ``stats_dtype``, the kept tiles in ``store_dtype``, the reference's tiles too
    (``keep_ref_tiles``, a TDPO loss), an fp32 ``[V, D]`` accumulator for a trainable half weight over several groups
    (``half_weight_grad``), ``converted_bytes`` of heads converted to their GEMM operands once for the call
    (reserved when the budget allows, :func:`plan_pair_groups`), ``grad_itemsize``: the weight gradient's element
    size where the weight needs one (its memory holds a scaled store's first chunks: :meth:`groups`), else 0, and
    ``policy_converted_bytes``: the policy's head as GEMM operands where it is converted (a scaled store keeps its
    rows in what it leaves of the weight gradient's memory), else 0."""

    kept_per_row: tuple[int, ...] | list[int]
    vocab: int
    dim: int
    stats_dtype: torch.dtype
    keep_ref_tiles: bool
    half_weight_grad: bool
    converted_bytes: int = 0
    store_dtype: torch.dtype | None = None  # what is kept of each logit (plan.kept_store_dtype); None: stats_dtype
    grad_itemsize: int = 0
    policy_converted_bytes: int = 0

    @property
    def bytes_per_token(self) -> int:
        store = self.stats_dtype if self.store_dtype is None else self.store_dtype
        per_head = self.vocab * store.itemsize
        if store != self.stats_dtype:  # a scaled store keeps its running maxima beside
            per_head += scaled_store_bytes_per_token(self.vocab)
        return per_head * (2 if self.keep_ref_tiles else 1)

    @property
    def accumulator_bytes(self) -> int:
        return self.vocab * self.dim * self.stats_dtype.itemsize if self.half_weight_grad else 0

    @property
    def tokens_per_pair(self) -> list[int]:
        pairs = len(self.kept_per_row) // 2
        return [self.kept_per_row[b] + self.kept_per_row[pairs + b] for b in range(pairs)]

    @property
    def one_group_bytes(self) -> int:
        """The budget in bytes under which the whole batch is one group, its heads converted once (a scaled store:
        what of it lies beside the weight gradient's memory, and no weight-gradient accumulator)."""
        if self.scaled_store:
            return self._scaled_bytes()[0]
        return sum(self.kept_per_row) * self.bytes_per_token + self.accumulator_bytes + self.converted_bytes

    @property
    def scaled_store(self) -> bool:
        return self.store_dtype is not None and self.store_dtype != self.stats_dtype

    def budget_bytes(self, budget_mb: float | None, device: torch.device) -> int:
        """``eager_budget_mb`` in bytes, or the default for this store on ``device`` (:func:`.plan.eager_budget_bytes`:
        nothing beside an fp32 weight gradient that holds a scaled store of the policy's weights alone)."""
        alone_in_fp32 = self.scaled_store and self.grad_itemsize >= 4 and not self.keep_ref_tiles
        return eager_budget_bytes(budget_mb, device, self._scaled_bytes()[1] if alone_in_fp32 else None)

    def _scaled_bytes(self) -> tuple[int, int, int, int]:
        """A scaled store's ``(bytes beside the weight gradient, shifts' bytes, bytes a column, columns in the
        gradient's memory)``: the gradient has ``D * grad_itemsize`` bytes a column, a column of the store
        ``2 n`` (``4 n`` with the reference's), and the store's chunks lie at or after their own columns' rows of it
        (:class:`~.sources.StorePlacement`), so it holds ``V * min(1, grad / store)`` columns (up to one chunk's
        alignment less)."""
        total, heads = sum(self.kept_per_row), 2 if self.keep_ref_tiles else 1
        column = total * self.store_dtype.itemsize * heads
        shifts = total * scaled_store_bytes_per_token(self.vocab) * heads
        grad_column = self.dim * self.grad_itemsize
        in_grad = self.vocab * grad_column // max(column, grad_column) if grad_column else 0
        return (self.vocab - in_grad) * column + shifts, shifts, column, in_grad

    def groups(self, budget_bytes: int) -> PairGroups | str:
        """The groups within ``budget_bytes``: a scaled store is always one group, whose gradients the backward
        forms from it with no accumulator, in the weight gradient's memory as far as it goes and beside it within
        the budget (with the policy's converted rows, converted once for the call, in what the gradient's memory
        has left): whole when that fits, else the chunks that fit (``store_vocab`` columns or so); otherwise
        :func:`plan_pair_groups`."""
        if not self.scaled_store:
            return plan_pair_groups(self.tokens_per_pair, self.bytes_per_token, budget_bytes, self.accumulator_bytes,
                                    self.converted_bytes)
        pairs, total = len(self.tokens_per_pair), sum(self.kept_per_row)
        beside, shifts, column, in_grad = self._scaled_bytes()
        if beside <= budget_bytes:
            left = self.vocab * (self.dim * self.grad_itemsize - column)  # the gradient's memory after the store
            share = min(1.0, max(left, 0) / self.policy_converted_bytes) if self.policy_converted_bytes else 0.0
            return PairGroups(pairs, ((0, pairs),), (total,), budget_bytes - beside, store_room=budget_bytes - shifts,
                              operand_share=share)
        room = max(budget_bytes - shifts, 0)
        columns = in_grad + room // column
        if columns == 0:
            return f"a scaled store of {_mib(beside)} keeps no column within eager_budget_mb={_mib(budget_bytes)}"
        return PairGroups(pairs, ((0, pairs),), (total,), 0, store_vocab=columns, store_room=room)


def estimated_slower(need: EagerNeed, groups: PairGroups, heads: list[LinearHead], converted: list[int],
                     sdt: torch.dtype, opts: TokenOptions, caller: str) -> str | None:
    """Why ``auto`` should not run eager here: on an accelerator, the recompute schedule's estimated cost
    (:mod:`~dpo_kernels.ops.linear.cost`: GEMMs, traffic outside them, launches, at estimated rates) is lower than the
    eager schedule's with these groups. ``None`` when eager is estimated the cheaper, or on the CPU (no estimate).
    ``converted``: each head's bytes as GEMM operands. Both estimates are logged at debug level, as ``caller``'s."""
    weight = heads[0].weight
    device = weight.device
    if not plans.estimates_cost(device):
        return None
    facts = cost.HeadFacts(
        n=groups.kept, vocab=need.vocab, dim=need.dim, with_ref=len(heads) > 1, kl_grad=need.keep_ref_tiles,
        policy_converted=converted[0], ref_converted=0 if len(heads) < 2 else converted[1],
        half_weight_grad=need.half_weight_grad, fp32_weight_grad=weight.requires_grad and weight.dtype == sdt)
    store_bytes = (need.stats_dtype if need.store_dtype is None else need.store_dtype).itemsize
    # a scaled store keeps a share of the policy's converted rows in the gradient's memory; else whole converted
    # heads where the budget leaves room for them
    held = groups.operand_share if need.scaled_store else float(groups.spare_bytes >= need.converted_bytes)
    kept = 1.0 if groups.store_vocab is None else groups.store_vocab / need.vocab
    eager = cost.eager(facts, opts, groups.tokens, store_bytes, held, kept)
    recompute = cost.recompute(facts, opts)
    what = f"{len(groups.bounds)} group(s)" + ("" if kept == 1.0 else f", {kept:.0%} of the vocabulary kept")
    if not torch.compiler.is_compiling():
        _log.debug("%s: estimated on %s: eager (%s) %s, recompute %s", caller, device, what, eager, recompute)
    if eager.seconds <= recompute.seconds:
        return None
    return (f"the eager schedule ({what}) is estimated slower here: {eager} against the recompute schedule's "
            f"{recompute}")


def _mib(size: int) -> str:
    """A byte count as people read it: ``3006.0 MiB``, ``1.0 KiB``, ``0 bytes``."""
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.1f} KiB" if size >= 2**10 else f"{size} bytes"


@dataclass(frozen=True)
class EagerCall:
    """The non-tensor arguments of one eager call: options, tile kernels, the groups, whether the reference's tiles
    are kept (a TDPO loss), whether the logged statistics are folded, the group loss and the vocabulary slice."""

    opts: TokenOptions
    kernels: TileKernels
    groups: PairGroups
    keep_ref_tiles: bool
    logging: bool
    group_loss: GroupLoss
    vocab_slice: VocabSlice | None = None


def eager_pair_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor,
                     call: EagerCall) -> tuple[torch.Tensor, TokenStats]:
    """``policy.hidden [2B, T, D]``, ``policy.weight [V, D]``, ``labels [2B, T]`` (and the reference head beside) ->
    ``(loss, token_stats)``: the loss (0-dim, its gradients computed in this call) and the per-token statistics of
    the recompute schedule (``logged`` only with ``call.logging``). ``logp`` and ``kl`` stay differentiable."""
    if ref is not None:
        ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    outs = _EagerPairs.apply(policy.hidden, policy.weight, policy.bias, labels, ref, call)
    loss, logp, rest = outs[0], outs[1], list(outs[2:])
    ref_logp = rest.pop(0) if ref is not None else None
    kl = rest.pop(0) if ref is not None and call.keep_ref_tiles else None  # a KL only for a TDPO loss (fold_all)
    logged = dict(zip(LOGGED_OUTPUTS, rest, strict=True)) if call.logging else None
    return loss, TokenStats(logp, ref_logp, kl, logged)


@dataclass
class _GroupGrads:
    """One group's share of the loss's gradient with respect to the hidden states: fp32 ``dh [n_g, D]`` at the
    group's kept tokens, and where they sit in the batch."""

    batch_rows: torch.Tensor | None
    rows: KeptTokens
    shape: torch.Size
    dh: torch.Tensor | None


@dataclass
class _GroupResult:
    """One group's forward (``out`` of :func:`.loop.finish_forward`, ``lse``/``ref_lse`` ``[2B_g, T]``), its share
    of the loss, its ``dH`` and, for a call of one group, the weight gradient written by it."""

    out: TokenStats
    lse: torch.Tensor
    ref_lse: torch.Tensor | None
    loss: torch.Tensor
    grads: _GroupGrads
    dw: torch.Tensor | None
    deferred: "_DeferredGrads | None" = None


@dataclass
class _DeferredGrads:
    """One group's gradients left to the backward (a scaled store over one group): the kept weights (their sources,
    filled), the forward's ``lse`` and per-token upstream, and the tile plan. The backward forms ``dZ`` once, with
    the loss's upstream scale inside it, and from it ``dH`` (fp32 at the kept tokens), each chunk's ``dW`` with one
    GEMM and one rounding (no ``[V, D]`` accumulator, no pass to scale one) and ``db``: the forward runs no ``dZ``
    pass at all, and the store is read once (2 bytes a logit, 4 with the KL). ``dw``: the weight's gradient,
    allocated by the forward, whose memory holds part of the store until each chunk's ``dW`` is written over it."""

    rows: KeptTokens
    policy: object
    bw: Backward
    plan: object
    dw: torch.Tensor | None

    def grads(self, grad_loss: torch.Tensor, need: tuple[bool, bool, bool]):
        """``(dH [n, D] fp32 at the kept tokens, dW like the weight, db [V] fp32)``, each scaled by ``grad_loss``;
        ``None`` for a gradient not in ``need``."""
        bw = self.bw
        scaled = Backward(bw.lse, bw.ref_lse, bw.g * grad_loss, None if bw.g_kl is None else bw.g_kl * grad_loss,
                          bw.opts, bw.kernels)
        with no_autocast(bw.g.device):
            return grad_all(self.rows, self.policy, None, scaled, need, self.plan, dw_out=self.dw)


@dataclass
class KeptForward:
    """A forward that kept what its backward needs of each tile (:func:`kept_forward`): the per-token results and
    ``lse`` (and ``ref_lse``) ``[n]``, the statistics, the sources as the forward left them (``ref``: the
    reference's, a :class:`~.sources.StoredSource` where its tiles are kept) and the backward's tile plan."""

    out: TokenStats
    lse: torch.Tensor
    ref_lse: torch.Tensor | None
    stats: torch.Tensor
    ref_stats: torch.Tensor | None
    policy: GemmSource
    ref: GemmSource | None
    backward_plan: object
    scaled: bool

    def filled_policy(self):
        """The policy's source as the backward reads it (a scaled store with the label logits of the statistics,
        and the reference's weights where it keeps them)."""
        return self.policy.filled(self.stats, self.ref_stats) if self.scaled else self.policy.filled()


def kept_forward(head: LinearHead, ref_head: LinearHead | None, rows: KeptTokens, shape: torch.Size,
                 products, ref_products, opts: TokenOptions, kernels: TileKernels, logging: bool,
                 vocab_slice: VocabSlice | None, *, scaled: bool, keep_ref: bool, with_kl: bool,
                 dw: torch.Tensor | None, store_room: int | None, buffers: tuple = (None, None),
                 operands: tuple = (None, None), log_as: str) -> KeptForward:
    """The one forward of both eager schedules (``fused_dpo_loss``'s groups here, the per-token functions' in
    :mod:`.stored`) over ``rows`` of ``head`` (and ``ref_head``): ``scaled``: the policy's softmax weights in a
    :class:`~.sources.ScaledSource` placed in ``dw``'s memory (the weight's gradient, or ``None``) and beside it
    within ``store_room`` bytes, the reference's too with ``keep_ref`` (its debug line prefixed ``log_as``); else
    :class:`~.sources.StoredSource` fp32 tiles in ``buffers`` (``None``: their own), the reference's only with
    ``keep_ref``; ``operands``: each head converted once for the call (``None``: chunk by chunk); ``with_kl``: the
    KL is wanted (:func:`.loop.fold_all`); ``shape``: the per-token results'."""
    device, vocab, sdt = head.hidden.device, head.weight.shape[0], products.out_dtype
    if scaled:
        policy = ScaledSource.of(head, rows, products, plans.SCALED_STORE_DTYPE, keep_ref, dw)
    else:
        policy = StoredSource.of(head, rows, products, buffers[0], operands[0])
    ref_source = None
    if ref_head is not None:
        if keep_ref and not scaled:
            ref_source = StoredSource.of(ref_head, rows, ref_products, buffers[1], operands[1])
        else:
            ref_source = GemmSource.of(ref_head, rows, ref_products, operands[1])
    dz_bytes = 0 if products.operand_dtype == sdt else products.operand_bytes
    plan = tile_plan(rows, policy, ref_source, opts, device, dz_bytes, with_kl=with_kl)
    if scaled:
        policy.keep(list(plan.vocab_chunks(vocab)), ref_source, store_room)
        _log.debug("%s: %s", log_as, policy.placement)
    with no_autocast(device):
        stats, ref_stats = fold_all(rows, policy, ref_source, opts, kernels, logging, device, plan, with_kl=with_kl)
    out, lse, ref_lse = finish_forward(stats, ref_stats, rows, shape, vocab_slice, vocab, logging, with_kl=with_kl)
    # a scaled store's dZ is always a new tile (in its fp32 scratch where the operands are fp32)
    backward_plan = plan_stored_backward(plan, rows.n, products.operand_bytes if scaled else dz_bytes, opts, device,
                                         dim=head.weight.shape[1])
    return KeptForward(out, lse, ref_lse, stats, ref_stats, policy, ref_source, backward_plan, scaled)


def _run_group(hidden, weight, bias, labels, ref: LinearHead | None, products, ref_products, call: EagerCall,
               group: int, need, dw, db, buffers, operands) -> _GroupResult:
    """Forward and loss gradient of group ``group`` of pairs; ``dW`` and ``db`` are accumulated into ``dw`` /
    ``db`` (``dw`` ``None``: written here, one group); ``buffers``: the policy's and the reference's kept-tile
    buffers, and ``operands`` their heads as GEMM operands (``None``: no conversion), shared by every group.

    A scaled store (``buffers`` ``None``; always one group) leaves every gradient to the backward, which reads the
    kept weights (:class:`_DeferredGrads`); its store lies in ``dw``'s memory (the weight's gradient, allocated by
    the forward, ``None`` without one) and beside it within the budget's room, and the policy's head rows converted
    once for the call, where the head is converted, in what the store leaves of ``dw``'s memory."""
    bounds = call.groups.bounds[group]
    opts, device = call.opts, hidden.device
    batch_rows = call.groups.rows(*bounds, device)

    def pick(x):
        return x if batch_rows is None or x is None else x.index_select(0, batch_rows)

    group_labels = pick(labels)
    offset = 0 if call.vocab_slice is None else call.vocab_slice.start
    rows = KeptTokens(group_labels, opts.ignore_index, offset, count=call.groups.tokens[group])
    sdt = products.out_dtype
    keep_ref = ref is not None and call.keep_ref_tiles
    # a scaled store keeps the reference's weights beside the policy's: the reference is then only a GEMM source
    scaled = buffers is None
    head = LinearHead(pick(hidden), weight, bias)
    ref_head = None if ref is None else LinearHead(pick(ref.hidden), ref.weight, ref.bias)
    kept = kept_forward(head, ref_head, rows, group_labels.shape, products, ref_products, opts, call.kernels,
                        call.logging, call.vocab_slice, scaled=scaled, keep_ref=keep_ref, with_kl=keep_ref,
                        dw=dw if scaled else None, store_room=call.groups.store_room, buffers=buffers or (None, None),
                        operands=operands, log_as="fused_dpo_loss: the scaled store")
    out, lse, ref_lse = kept.out, kept.lse, kept.ref_lse
    loss, g_logp, g_kl = _group_upstream(out, batch_rows, keep_ref, call)
    g, g_kl = upstream(rows, g_logp, g_kl, sdt, device)
    with no_autocast(device):
        bw = Backward(lse, ref_lse, g, g_kl, opts, call.kernels)
        dh = group_dw = group_db = deferred = None
        if scaled:  # the backward forms every gradient, from the kept weights and converted rows
            deferred = _DeferredGrads(rows, kept.filled_policy(), bw, kept.backward_plan, dw)
        else:
            ref_filled = None if g_kl is None else kept.ref.filled()
            dh, group_dw, group_db = grad_all(rows, kept.filled_policy(), ref_filled, bw, need, kept.backward_plan,
                                              dw_into=dw)
    if db is not None and group_db is not None:
        db += group_db
    if dh is not None and call.vocab_slice is not None:
        all_reduce_hidden_grad(dh, call.vocab_slice.group)
    shape = group_labels.shape
    return _GroupResult(out, rows.scatter(lse, shape, sdt),
                        None if ref_lse is None else rows.scatter(ref_lse, shape, sdt),
                        loss, _GroupGrads(batch_rows, rows, shape, dh), group_dw, deferred)


def _tile_buffers(call: EagerCall, vocab: int, sdt: torch.dtype, with_ref: bool, device: torch.device):
    """One kept-tile buffer of ``sdt`` (the tiles' dtype) for the policy (and one for the reference with a TDPO
    loss), sized for the largest group and reused by every group of the call; inside
    :func:`keep_cpu_tile_buffers`, taken from the buffers it keeps. (A scaled store places its own chunks:
    :meth:`.sources.ScaledSource.keep`.)"""
    entries = call.groups.largest_group * vocab
    count = 2 if with_ref and call.keep_ref_tiles else 1
    # No transparent-huge-page advice: on the development machine (THP in madvise mode, defrag on madvise) it saved
    # ~0.05 s of first-touch faults on a 393 MiB buffer but stalled up to 2.7 s in compaction now and then.
    kept = _CPU_CACHE.take(sdt, entries, count) if device.type == "cpu" and _CPU_CACHE is not None else []
    buffers = kept + [torch.empty(entries, dtype=sdt, device=device) for _ in range(count - len(kept))]
    return buffers + [None] * (2 - count)


class _CpuTileCache:
    """Kept-tile buffers held between calls, at most ``limit`` bytes in all, the most recent call's first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffers: list[torch.Tensor] = []

    def take(self, dtype: torch.dtype, entries: int, count: int) -> list[torch.Tensor]:
        """Up to ``count`` kept buffers of ``dtype`` with at least ``entries`` elements, no longer kept."""
        mine = [b for b in self.buffers if b.dtype == dtype and b.numel() >= entries][:count]
        self.buffers = [b for b in self.buffers if not any(b is m for m in mine)]
        return mine

    def give(self, buffers: list) -> None:
        kept = [b for b in buffers if b is not None]
        fresh, used = [], 0
        for b in kept + self.buffers:  # newest first, within the limit
            size = b.numel() * b.element_size()
            if used + size <= self.limit:
                fresh.append(b)
                used += size
        self.buffers = fresh


_CPU_CACHE: _CpuTileCache | None = None


@contextlib.contextmanager
def keep_cpu_tile_buffers(max_mb: float = 1024):
    """Within this context the eager schedule keeps its CPU kept-tile buffers between calls (at most ``max_mb`` in
    all, across dtypes) and frees them on exit. Outside it (the default) each call's buffers are freed with the call.

    A fresh buffer of a few hundred MiB is faulted in page by page by the GEMMs that first write it: on the 2-core
    development machine that made the forward GEMMs of sigmoid DPO (3072 kept tokens, V = 32000, a 393 MiB store)
    about 0.3 s slower than into pages already touched, a tenth of the call. A training loop on the CPU may trade
    that much resident memory for the time; accelerators reuse memory through their caching allocator and need
    nothing of this."""
    global _CPU_CACHE
    if not (is_finite_number(max_mb) and max_mb >= 0):
        raise ValueError(f"keep_cpu_tile_buffers: max_mb must be a number >= 0, got {max_mb!r}")
    outer, _CPU_CACHE = _CPU_CACHE, _CpuTileCache(int(max_mb * 2**20))
    try:
        yield
    finally:
        _CPU_CACHE = outer


def _group_upstream(out: TokenStats, batch_rows, keep_ref: bool, call: EagerCall):
    """The group's loss and its gradient with respect to the group's per-token log-probs (and KL), by autograd over
    the ``[2B_g, T]`` statistics only."""
    logp = out.logp.detach().requires_grad_()
    kl = None if out.kl is None else out.kl.detach().requires_grad_(keep_ref)
    with torch.enable_grad():
        loss = call.group_loss(batch_rows, logp, out.ref_logp, kl, out.logged)
        inputs = [logp] + ([kl] if keep_ref else [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), grads[0], (grads[1] if keep_ref else None)


def _assemble(per_group: list[torch.Tensor], grads: list[_GroupGrads], total_shape) -> torch.Tensor:
    """Per-group ``[2B_g, T, ...]`` tensors -> one ``[2B, T, ...]`` tensor in batch row order (the groups cover every
    row)."""
    if len(per_group) == 1:
        return per_group[0]
    first = per_group[0]
    out = torch.empty((*total_shape, *first.shape[2:]), dtype=first.dtype, device=first.device)
    for part, group in zip(per_group, grads, strict=True):
        out.index_copy_(0, group.batch_rows, part)
    return out


class _EagerPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref: LinearHead | None, call: EagerCall):
        ctx.set_materialize_grads(False)
        products, ref_products = head_products(hidden, weight, ref)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        vocab, dim, sdt = weight.shape[0], weight.shape[1], products.out_dtype
        several = len(call.groups.bounds) > 1
        dw = db = buffers = None
        # A weight's gradient is rounded once, after the loss's upstream scale (a loss scaler's 65536, a gradient-
        # accumulation 1/k) is applied: over one group of a scaled store every gradient is formed by the backward
        # from the kept weights with the scale inside dZ (defer), and the weight's gradient, allocated here, holds
        # the store until then; else a half weight's is accumulated in fp32 until the backward
        store_dtype = plans.kept_store_dtype(products.operand_dtype, sdt, call.opts)
        defer = store_dtype != sdt  # a scaled store: one group (EagerNeed.groups)
        if defer:
            dw = torch.empty((vocab, dim), dtype=weight.dtype, device=hidden.device) if need[1] else None
        else:
            if need[1] and (several or weight.dtype != sdt):
                dw = torch.zeros((vocab, dim), dtype=sdt, device=hidden.device)
            db = torch.zeros(vocab, dtype=sdt, device=hidden.device) if need[2] else None
            buffers = _tile_buffers(call, vocab, store_dtype, ref is not None, hidden.device)
        # a scaled store keeps the policy's converted rows beside its chunks (ScaledSource.keep); the reference's
        # rows, read by the forward's one sweep, are converted where they are used
        operands = (None, None) if defer else _shared_operands(weight, products, ref, ref_products,
                                                               call.groups.spare_bytes)
        results = [_run_group(hidden, weight, bias, labels, ref, products, ref_products, call, group, need, dw, db,
                              buffers, operands) for group in range(len(call.groups.bounds))]
        del operands
        if hidden.device.type == "cpu" and _CPU_CACHE is not None and not defer:
            _CPU_CACHE.give(buffers)
        del buffers  # deferred gradients keep their group's store alive until the backward
        grads = [r.grads for r in results]
        loss = torch.stack([r.loss for r in results]).sum()
        if not several:
            dw = results[0].dw  # deferred: None, the backward's _DeferredGrads holds it
        out = _assemble_stats([r.out for r in results], grads, labels.shape)
        lse = _assemble([r.lse for r in results], grads, labels.shape)
        ref_lse = None if ref is None else _assemble([r.ref_lse for r in results], grads, labels.shape)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.grads, ctx.dw, ctx.db, ctx.lse, ctx.ref_lse = grads, dw, db, lse, ref_lse
        ctx.deferred = results[0].deferred
        ctx.ref, ctx.products, ctx.call = ref, (products, ref_products), call
        frozen = [t for t in (out.ref_logp, *(out.logged or {}).values()) if t is not None]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return tuple(t for t in (loss, out.logp, out.ref_logp, out.kl, *(out.logged or {}).values()) if t is not None)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_logp, *grad_rest):
        hidden, weight, bias, labels = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        dh = dw = db = None
        if grad_loss is not None:
            if ctx.grads is None:
                raise RuntimeError("the eager schedule hands its gradients out once (scaled in place, so that no "
                                   "second [V, D] buffer is allocated): backpropagating through fused_dpo_loss's loss "
                                   "twice (retain_graph=True) needs schedule='recompute'")
            # scaled in place and released: autograd may then keep the buffer as the gradient itself
            grads, dw, db, ctx.grads, ctx.dw, ctx.db = ctx.grads, ctx.dw, ctx.db, None, None, None
            deferred, ctx.deferred = ctx.deferred, None
            if deferred is not None:
                grads[0].dh, dw, db = deferred.grads(grad_loss, need)
                del deferred
                if grads[0].dh is not None and ctx.call.vocab_slice is not None:
                    all_reduce_hidden_grad(grads[0].dh, ctx.call.vocab_slice.group)
                dh = _hidden_grad(grads, hidden) if need[0] else None
                db = None if db is None else db.to(bias.dtype)
            else:
                dh = _hidden_grad(grads, hidden, grad_loss) if need[0] else None
                dw = None if dw is None or not need[1] else _scaled_once(dw, grad_loss, weight)
                db = None if db is None or not need[2] else _scaled_once(db, grad_loss, bias)
        grad_kl = grad_rest[1] if ctx.ref is not None and ctx.call.keep_ref_tiles else None
        if grad_logp is not None or grad_kl is not None:  # a gradient from outside the loss: recompute that part
            extra = _recompute_backward(ctx, hidden, weight, bias, labels, grad_logp, grad_kl, need)
            dh, dw, db = (_add(a, b) for a, b in zip((dh, dw, db), extra, strict=True))
        return dh, dw, db, None, None, None


def _assemble_stats(parts: list[TokenStats], grads: list[_GroupGrads], total_shape) -> TokenStats:
    """Per-group statistics -> the batch's, field by field."""
    def field(pick):
        return None if pick(parts[0]) is None else _assemble([pick(p) for p in parts], grads, total_shape)

    logged = None if parts[0].logged is None else {
        name: _assemble([p.logged[name] for p in parts], grads, total_shape) for name in LOGGED_OUTPUTS}
    return TokenStats(field(lambda p: p.logp), field(lambda p: p.ref_logp), field(lambda p: p.kl), logged)


def _shared_operands(weight, products, ref: LinearHead | None, ref_products, spare_bytes: int):
    """The heads converted to their GEMM operands once for the call, shared by every pass of every group (fp32
    master heads under autocast; on the CPU a half head, widened): ``(policy's, reference's)``, each ``None`` where
    the head is its own operand or where ``eager_budget_mb`` has no room left for the copy beside the tiles (each of
    its chunks is then converted where it is used). One head as both (a PEFT model as its own reference) is
    converted once."""
    def fits(w, p) -> bool:
        return p.converts(w) and w.numel() * p.operand_bytes <= spare_bytes

    policy = operand_head(weight, products) if fits(weight, products) else None
    if policy is not None:
        spare_bytes -= weight.numel() * products.operand_bytes
    if ref is None:
        return policy, None
    # the same memory read the same way (a meta tensor has no memory: every one reports address 0)
    same = (ref_products == products and weight.device.type != "meta"
            and ref.weight.data_ptr() == weight.data_ptr()
            and ref.weight.shape == weight.shape and ref.weight.stride() == weight.stride()
            and ref.weight.dtype == weight.dtype)
    if same:
        return policy, policy
    return policy, operand_head(ref.weight, ref_products) if fits(ref.weight, ref_products) else None


def _scaled_once(grad: torch.Tensor, grad_loss: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The fp32 ``grad`` times the upstream, rounded once to ``like``'s dtype (in place when it is fp32 already)."""
    if grad.dtype == like.dtype:
        return grad.mul_(grad_loss)
    return torch.mul(grad, grad_loss, out=torch.empty(like.shape, dtype=like.dtype, device=like.device))


def _hidden_grad(grads: list[_GroupGrads], hidden: torch.Tensor, grad_loss: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The loss's ``dH`` like ``hidden``, each group's fp32 rows (scaled by ``grad_loss`` when they are not yet)
    rounded once."""
    parts = [g.rows.scatter(g.dh if grad_loss is None else g.dh.mul_(grad_loss), (*g.shape, hidden.shape[-1]),
                            hidden.dtype) for g in grads]
    return _assemble(parts, grads, hidden.shape[:2])


def _recompute_backward(ctx, hidden, weight, bias, labels, grad_logp, grad_kl, need):
    """The recompute schedule's backward for gradients that reach ``logp`` / ``kl`` from outside the loss."""
    call = ctx.call
    offset = 0 if call.vocab_slice is None else call.vocab_slice.start
    rows = KeptTokens(labels, call.opts.ignore_index, offset, count=call.groups.kept)
    sdt = ctx.products[0].out_dtype
    state = ForwardState(rows, rows.select(ctx.lse, sdt),
                                None if ctx.ref_lse is None else rows.select(ctx.ref_lse, sdt), call.opts,
                                call.kernels, ctx.ref, *ctx.products, call.vocab_slice)
    return linear_backward(hidden, weight, bias, state, grad_logp, grad_kl, need)


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b

