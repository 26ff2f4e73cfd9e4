"""The one tile loop of the linear path, shared by every tile-kernel backend, both schedules and given logits.

- Forward, token-major (:func:`fold_all`): for each token block and vocabulary chunk, the source's tile (one GEMM
  writing an fp32 logits tile, or a tile kept from the forward; :mod:`.sources`) and the
  reference's, folded by the backend's ``fold`` into ``O(n)`` statistics. :func:`finish_forward` turns them into the
  per-token results and ``lse`` (and ``ref_lse``), all a backward needs.
- Backward, vocabulary-major (:func:`grad_all`): for each vocabulary chunk ``c``, the tiles again, ``kernels.grad``
  forms ``dZ`` in the GEMM operand dtype, ``dH += dZ W_c`` goes into one fp32 ``[n, D]`` accumulator (or, for runs
  of kept chunks where the plan says a batch fills the GEMM's waves better, one batched GEMM into as many), and
  ``dW_c = dZ^T H`` is written once with fp32 accumulation inside the GEMM and one rounding to the weight's dtype
  (through an fp32 ``[vc, D]`` buffer only when the tokens are split into several blocks). There is no ``[V, D]``
  fp32 buffer and no atomic over the vocabulary. The reference is read only when the KL received a gradient.

:func:`linear_forward` / :func:`linear_backward` are the recompute schedule's two passes (:mod:`.recompute` wraps
them in its op and its Function). With a :class:`~dpo_kernels.ops.vocab_parallel.VocabSlice` the statistics are
combined across the group before ``lse`` is formed (:func:`finish_forward`, which a vocabulary slice of given logits
shares: :func:`dpo_kernels.ops.logits_path.slice_forward`), and ``dH`` is all-reduced in the backward.

Materialised beyond the inputs and the gradients themselves: the gathered kept rows ``[n, D]`` (operand dtype; only
when tokens are dropped or converted), the fp32 ``dH`` accumulator ``[n, D]``, the per-token statistics, and the
tiles of :mod:`.plan` (at most ``tile_budget_mb``).

Cost at ``n`` kept tokens: ``8 n D V`` FLOPs forward + backward (forward, recompute, ``dH``, ``dW``; ``12 n D V``
with the reference recomputed for a KL gradient), all on the tensor cores for half inputs on CUDA, plus about
``4 + 4 + 4 + 2 = 14`` bytes of tile traffic per logit (the fp32 tile written and read in each pass, ``dZ`` written
once in bf16, read by two GEMMs from L2 or HBM). At N = 8192, D = 4096, V = 128256 on an H100 (~790 TFLOP/s dense
bf16, ~3.3 TB/s) that is 44 ms of tensor-core time plus about 5 ms of tile traffic: the floor this design aims at.
This is the one statement of that design target, computed from peak rates; it is not a measurement (the README says
which GPU figures exist).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...options import TokenOptions, statistics_dtype
from ..common import LinearHead, nan_out_of_vocab
from ..token_stats import TokenStats
from ..transform import slope_at
from ..vocab_parallel import VocabSlice, all_reduce_hidden_grad, combine
from .contract import (
    LOGGED_OUTPUTS,
    STATS_ROWS,
    RefRow,
    StatRow,
    TileKernels,
    finish_lse,
    logging_outputs,
    new_ref_stats,
    new_stats,
    shift_factor,
)
from .kept import KeptTokens
from .plan import TilePlan, plan_tiles
from .products import Products, product_dtype, report_products
from .sources import AccumulatingSource, GemmSource, operand_head


def no_autocast(device: torch.device):
    """Inside the loop every dtype is explicit (:class:`Products`); nothing may be autocast again, in the forward or
    in a backward that runs under an autocast context."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return contextlib.nullcontext()


def bytes_per_entry(policy, ref, device: torch.device, dz_bytes: int = 0, shared: bool = False) -> int:
    """Tile bytes per entry that the tile budget bounds: what the sources allocate (:meth:`scratch_bytes`; the
    larger of the two where the reference's tiles share the policy's scratch, ``shared``) and ``dz_bytes`` of ``dZ``
    (at least 1)."""
    mine, theirs = policy.scratch_bytes(device), 0 if ref is None else ref.scratch_bytes(device)
    return max(1, (max(mine, theirs) if shared else mine + theirs) + dz_bytes)


def shares_scratch(policy, ref, with_kl: bool) -> bool:
    """Whether the reference's tiles go into the policy's tile scratch: without a KL (:func:`fold_all`), where the
    policy's tiles are computed into its scratch (not into a store of kept tiles)."""
    return ref is not None and not with_kl and policy.tiles_in_scratch


def tile_plan(rows: KeptTokens, policy, ref, opts: TokenOptions, device: torch.device, dz_bytes: int = 0,
              with_kl: bool = True):
    """The tiles of a pass over ``policy`` (and ``ref``) within the tile budget; a head source's width gives the
    ``dH`` term; ``with_kl`` as for :func:`fold_all`."""
    dim = getattr(policy, "dim", None)  # from logits: no head, no dH
    per_entry = bytes_per_entry(policy, ref, device, dz_bytes, shares_scratch(policy, ref, with_kl))
    return plan_tiles(rows.n, policy.vocab, per_entry, opts, device, dim=dim)


def fold_all(rows: KeptTokens, policy, ref, opts: TokenOptions, kernels: TileKernels, logging: bool,
             device: torch.device, plan: TilePlan | None = None, with_kl: bool = True):
    """Forward, token-major, over the tiles of ``policy`` (and ``ref``): ``(stats [3, n] (7 with the logging rows),
    ref_stats [4, n] or None)`` after one pass over this rank's vocabulary; ``plan`` fixes the tiles (a stored
    source's backward reads the same ones back). ``with_kl=False``: the caller wants no KL (its row of
    ``ref_stats`` stays 0), so each reference tile is folded alone (its max, sum and label logit) before the
    policy's tile is computed, into the same scratch where :func:`shares_scratch`: one fp32 tile fewer."""
    n, vocab, sdt = rows.n, policy.vocab, policy.out_dtype
    stats = new_stats(n, sdt, device, logging=logging)
    ref_stats = None if ref is None else new_ref_stats(n, sdt, device)
    plan = tile_plan(rows, policy, ref, opts, device, with_kl=with_kl) if plan is None else plan
    alone = ref is not None and not with_kl
    if shares_scratch(policy, ref, with_kl):
        policy.share_scratch_with(ref)
    for n0, n1 in plan.token_blocks(n):
        for v0, v1 in plan.vocab_chunks(vocab):
            ref_tile = None if ref is None else ref.tile(n0, n1, v0, v1, rows.labels)
            if alone:  # folded now: the policy's tile may be computed over it
                kernels.fold(ref_tile, ref_stats[: len(STATS_ROWS), n0:n1], None, None, opts)
                ref_tile = None
            tile = policy.tile(n0, n1, v0, v1, rows.labels)
            policy.fold(kernels, (n0, n1, v0, v1), tile, stats[:, n0:n1], ref_tile,
                        None if ref_tile is None else ref_stats[:, n0:n1], opts)
    return stats, ref_stats


def finish_forward(stats, ref_stats, rows: KeptTokens, shape: torch.Size, vocab_slice: VocabSlice | None,
                   vocab: int, logging: bool, with_kl: bool = True) -> tuple[TokenStats, torch.Tensor,
                                                                        torch.Tensor | None]:
    """Combine across a vocabulary-parallel group, then ``(token_stats, lse, ref_lse)``: the per-token results
    scattered to ``shape`` (no KL without ``with_kl``, :func:`fold_all`), and ``lse`` (and ``ref_lse``) ``[n]`` at
    the kept tokens, what a backward needs."""
    if vocab_slice is not None:
        combine(stats, ref_stats, vocab_slice.group)
    sdt = stats.dtype
    lse = finish_lse(stats[StatRow.MAX], stats[StatRow.SUM])
    ref_lse = None if ref_stats is None else finish_lse(ref_stats[RefRow.MAX], ref_stats[RefRow.SUM])
    offset, total = (0, vocab) if vocab_slice is None else (vocab_slice.start, vocab_slice.total)
    labels = rows.labels + offset  # global ids: one with check_labels=False may be out of range (NaN, never a crash)
    logp = rows.scatter(nan_out_of_vocab(stats[StatRow.LABEL_LOGIT] - lse, labels, total), shape, sdt)
    ref_logp = kl = logged = None
    if ref_stats is not None:
        ref_logp = rows.scatter(nan_out_of_vocab(ref_stats[RefRow.LABEL_LOGIT] - ref_lse, labels, total), shape, sdt)
        if with_kl:
            kl = rows.scatter(ref_stats[RefRow.WEIGHTED] / ref_stats[RefRow.SUM] - ref_lse + lse, shape, sdt)
    if logging:
        values = logging_outputs(stats, lse, total)
        logged = {name: rows.scatter(values[name], shape, values[name].dtype) for name in LOGGED_OUTPUTS}
    return TokenStats(logp, ref_logp, kl, logged), lse, ref_lse


def upstream(rows: KeptTokens, grad_logp, grad_kl, sdt: torch.dtype, device: torch.device):
    """``(g, g_kl)`` at the kept tokens: ``g`` zeros when the log-probs got no gradient, ``g_kl`` ``None`` when
    the KL got none (the reference is then never read)."""
    g = torch.zeros(rows.n, dtype=sdt, device=device) if grad_logp is None else rows.select(grad_logp, sdt)
    return g, (None if grad_kl is None else rows.select(grad_kl, sdt))


@dataclass(frozen=True)
class Backward:
    """What every backward tile reads: the forward's ``lse`` (and ``ref_lse``) and the upstream gradients ``g`` (and
    ``g_kl``, ``None`` when the KL received none) at the kept tokens, the options and the backend's tile kernels."""

    lse: torch.Tensor
    ref_lse: torch.Tensor | None
    g: torch.Tensor
    g_kl: torch.Tensor | None
    opts: TokenOptions
    kernels: TileKernels


class _DzScratch:
    """``dZ`` tiles in the GEMM operand dtype (``dtype`` ``None``: none, ``dZ`` overwrites the fp32 tile), allocated
    at the first tile that needs one (a backward whose chunks all go in batched runs never does)."""

    def __init__(self, plan: TilePlan, n: int, vocab: int, dtype: torch.dtype | None, device: torch.device) -> None:
        self.size = min(n, plan.tokens) * min(vocab, plan.vocab)
        self.dtype, self.device, self.buffer = dtype, device, None

    def view(self, rows: int, cols: int) -> torch.Tensor | None:
        if self.dtype is None:
            return None
        if self.buffer is None:
            self.buffer = torch.empty(self.size, dtype=self.dtype, device=self.device)
        return self.buffer[: rows * cols].view(rows, cols)


def _logits_grad(policy, ref, rows: KeptTokens, block: tuple[int, int, int, int], bw: Backward,
                 out: torch.Tensor | None) -> torch.Tensor | None:
    """``dZ [n1 - n0, v1 - v0]`` of the tile ``block = (n0, n1, v0, v1)``, formed by the policy's source into ``out``
    (``None``: over its fp32 tile); ``None`` when the gradient filter skips the tile."""
    n0, n1, v0, v1 = block
    ref_tile = None if ref is None else ref.tile(n0, n1, v0, v1, rows.labels)
    with_kl = bw.g_kl is not None  # ref is None here when the policy's source keeps the reference's weights
    return policy.grad(bw.kernels, block, rows.labels, bw.lse[n0:n1], bw.g[n0:n1], ref_tile,
                       bw.ref_lse[n0:n1] if with_kl else None, bw.g_kl[n0:n1] if with_kl else None, bw.opts, out)


def chunk_runs(chunks, batch: int, policy) -> Iterator[list[tuple[int, int]]]:
    """The vocabulary ``chunks`` in order, as runs of ``batch`` consecutive chunks of one width that the source
    lets a backward batch (``policy.batchable(v0)``), every other chunk alone."""
    run: list[tuple[int, int]] = []
    for v0, v1 in chunks:
        joins = batch > 1 and policy.batchable(v0)
        if run and (not joins or v1 - v0 != run[0][1] - run[0][0]):
            yield from ([chunk] for chunk in run)
            run = []
        if not joins:
            yield [(v0, v1)]
            continue
        run.append((v0, v1))
        if len(run) == batch:
            yield run
            run = []
    yield from ([chunk] for chunk in run)


def grad_all(rows: KeptTokens, policy: GemmSource, ref: GemmSource | None, bw: Backward,
             need: tuple[bool, bool, bool], plan: TilePlan | None = None, dw_into: torch.Tensor | None = None,
             dw_out: torch.Tensor | None = None):
    """Backward of the linear path, vocabulary-major: ``(dH [n, D] fp32, dW [V, D] in the weight's dtype, db [V]
    fp32)``, ``None`` for each gradient not in ``need``. ``dw_into``: an fp32 ``[V, D]`` buffer the weight gradient
    is accumulated into (and returned), for a gradient summed over several calls; ``dw_out``: a ``[V, D]`` tensor of
    the weight's dtype to write it into instead of a new one (rows ``v0:v1`` are written after every tile of chunks
    up to ``v1`` was formed: its memory may hold what those tiles read, :class:`.sources.StorePlacement`);
    ``plan``: the forward's, for stored tiles.

    Where the plan says so (``hidden_grad_batch``, :func:`.plan.hidden_grad_batch`: a ``dH`` output that fills its
    GEMM's last wave badly) and the source allows it (:func:`chunk_runs`), the ``dH`` products of consecutive chunks
    run as one batched GEMM into as many fp32 ``[n, D]`` partials, summed at the end; each chunk's ``dZ`` goes into
    the run's buffer (``policy.run_scratch``) and its ``dW`` and ``db`` are formed as alone."""
    need_dh, need_dw, need_db = need
    products, weight = policy.products, policy.weight
    n, (vocab, dim), device, sdt = rows.n, weight.shape, policy.h.device, products.out_dtype
    if plan is None:
        dz_bytes = 0 if products.operand_dtype == sdt else products.operand_bytes
        plan = tile_plan(rows, policy, ref, bw.opts, device, dz_bytes)
    one_block = plan.single_token_block(n)
    batch = plan.hidden_grad_batch
    batch = batch if batch > 1 and need_dh and one_block and products.batches(device.type) else 1
    runs = list(chunk_runs(plan.vocab_chunks(vocab), batch, policy))
    # a first run writes every partial (no zeros to fill and read)
    fresh = need_dh and len(runs[0]) > 1
    dh_parts = (torch.empty if fresh else torch.zeros)((batch, n, dim), dtype=sdt, device=device) if need_dh else None
    dh = None if dh_parts is None else dh_parts[0]
    accumulate = need_dw and dw_into is not None
    if need_dw and not accumulate:
        dw = torch.empty((vocab, dim), dtype=weight.dtype, device=device) if dw_out is None else dw_out
    else:
        dw = dw_into if need_dw else None
    db = torch.zeros(vocab, dtype=sdt, device=device) if need_db else None
    dz_dtype = None if products.operand_dtype == sdt else products.operand_dtype
    dz_scratch = _DzScratch(plan, n, vocab, dz_dtype, device)

    def weight_grads(dz: torch.Tensor, n0: int, n1: int, v0: int, v1: int, acc: torch.Tensor | None):
        """``db`` and ``dW`` of one tile: into the chunk's rows of ``dw`` with one GEMM where it can, else summed into
        ``acc`` (an fp32 ``[v1 - v0, D]`` buffer, made at the first tile that needs it), which is returned."""
        if need_db:
            db[v0:v1] += dz.sum(dim=0, dtype=sdt)
        if accumulate:
            products.accumulate(dw[v0:v1], dz.T, policy.h[n0:n1])
        elif need_dw and not (acc is None and one_block and products.write(dw[v0:v1], dz.T, policy.h[n0:n1])):
            acc = torch.zeros((v1 - v0, dim), dtype=sdt, device=device) if acc is None else acc
            products.accumulate(acc, dz.T, policy.h[n0:n1])
        return acc

    def finish_chunk(v0: int, v1: int, acc: torch.Tensor | None, formed: bool) -> None:
        """The chunk's rows of ``dw`` from ``acc``, or zeros where no tile formed a ``dZ`` (the gradient filter)."""
        if need_dw and not accumulate and (acc is not None or not formed):
            dw[v0:v1].copy_(acc) if acc is not None else dw[v0:v1].zero_()

    for run in runs:
        if len(run) > 1:  # one token block: each chunk's dZ in the run's buffer, one GEMM for their dH products
            (v0, width), count = (run[0][0], run[0][1] - run[0][0]), len(run)
            dzs = policy.run_scratch(count, n, width, products.operand_dtype)
            for k, (c0, c1) in enumerate(run):
                _logits_grad(policy, ref, rows, (0, n, c0, c1), bw, dzs[k])
            products.accumulate_batched(dh_parts, dzs, policy.weight_chunk(v0, run[-1][1]).view(count, width, dim),
                                        fresh=fresh)
            fresh = False
            for k, (c0, c1) in enumerate(run):
                finish_chunk(c0, c1, weight_grads(dzs[k], 0, n, c0, c1, None), True)
            continue
        (v0, v1), acc, formed = run[0], None, False
        if need_dh:  # the chunk's operands made (and kept by the source) first: a run's are freed before dZ's scratch
            policy.weight_chunk(v0, v1)
        for n0, n1 in plan.token_blocks(n):
            dz = _logits_grad(policy, ref, rows, (n0, n1, v0, v1), bw, dz_scratch.view(n1 - n0, v1 - v0))
            if dz is None:  # grad_filter_eps: every |p - onehot| (and |p - q|) of the tile is negligible
                continue
            if need_dh:
                products.accumulate(dh[n0:n1], dz, policy.weight_chunk(v0, v1))
            acc, formed = weight_grads(dz, n0, n1, v0, v1, acc), True
        finish_chunk(v0, v1, acc, formed)
    for k in range(1, batch):
        dh.add_(dh_parts[k])
    return dh, dw, db


# --------------------------------------------------------------------------------------------- the recompute passes


@dataclass(frozen=True)
class ForwardState:
    """What a forward hands its backward besides the input tensors: the kept tokens, ``lse`` (and ``ref_lse``)
    ``[n]`` at them, the options and tile kernels, and for the linear path the reference head, both heads'
    :class:`Products` and the vocabulary slice."""

    rows: KeptTokens
    lse: torch.Tensor
    ref_lse: torch.Tensor | None
    opts: TokenOptions
    kernels: TileKernels
    ref: LinearHead | None = None
    products: Products | None = None
    ref_products: Products | None = None
    vocab_slice: VocabSlice | None = None
    hidden_grads: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (J, K) of a frozen head, see below


def linear_forward(hidden, weight, bias, labels, ref: LinearHead | None, products: Products,
                   ref_products: Products | None, opts: TokenOptions, kernels: TileKernels, logging: bool = False,
                   vocab_slice: VocabSlice | None = None, kept_count: int | None = None,
                   frozen_head: tuple[bool, bool] = (False, False), with_kl: bool = True):
    """Forward of the linear path with the products of :func:`head_products`: ``(token_stats, state)``;
    ``kept_count`` as for :class:`KeptTokens`. ``frozen_head = (on, with_kl)``: the head needs no gradient and the
    hidden states do: the forward also forms their gradient (:func:`hidden_grads`, for the KL too with ``with_kl``),
    and the backward is a per-token scale of it. ``with_kl=False``: no KL is computed (:func:`fold_all`; a KL
    gradient for a frozen head needs it)."""
    with_kl = with_kl or frozen_head[1]
    rows = KeptTokens(labels, opts.ignore_index, 0 if vocab_slice is None else vocab_slice.start, kept_count)
    with no_autocast(hidden.device):
        head = LinearHead(hidden, weight, bias)
        if frozen_head[0]:
            policy = AccumulatingSource.of(head, rows, products, with_q=ref is not None and frozen_head[1],
                                           kernels=kernels)
        else:
            policy = GemmSource.of(head, rows, products)
        ref_source = None if ref is None else GemmSource.of(ref, rows, ref_products)
        plan = tile_plan(rows, policy, ref_source, opts, hidden.device, with_kl=with_kl)
        if not plan.single_token_block(rows.n):  # token-major: every chunk is used once per token block
            policy.operand_weight = operand_head(weight, products)
            if ref_source is not None:
                ref_source.operand_weight = operand_head(ref.weight, ref_products)
        stats, ref_stats = fold_all(rows, policy, ref_source, opts, kernels, logging, hidden.device, plan, with_kl)
    out, lse, ref_lse = finish_forward(stats, ref_stats, rows, labels.shape, vocab_slice, weight.shape[0], logging,
                                       with_kl)
    grads = None
    if frozen_head[0]:
        with no_autocast(hidden.device):
            grads = hidden_grads(policy, stats, ref_stats, rows, opts, vocab_slice)
    return out, ForwardState(rows, lse, ref_lse, opts, kernels, ref, products, ref_products, vocab_slice, grads)


def hidden_grads(policy: AccumulatingSource, stats, ref_stats, rows: KeptTokens, opts: TokenOptions,
                 vocab_slice: VocabSlice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen head's ``(J, K)``, fp32 ``[n, D]`` (MATH.md §1): ``J = d logp / dh = t'(x_y) W_y - P / s`` and
    ``K = d KL / dh = P / s - Q / s_r`` (``None`` without the reference's accumulator), from the accumulators of
    ``policy``, each brought from its shift to the final max of the statistics (combined across a vocabulary-
    parallel group: each rank's partial sums are brought to the global maxima, then summed over the group with the
    label's row, which one rank holds). The accumulators are overwritten."""
    p, q = policy.p, policy.q
    # one pass over each accumulator: to the max, and (without a group to sum over first) by the sum
    p_scale = shift_factor(p.shift, stats[StatRow.MAX])
    q_scale = None if q is None else shift_factor(q.shift, ref_stats[RefRow.MAX])
    if vocab_slice is None:
        p_scale = p_scale.div_(stats[StatRow.SUM])
        q_scale = None if q is None else q_scale.div_(ref_stats[RefRow.SUM])
    p, q = p.values.mul_(p_scale.unsqueeze(1)), None if q is None else q.values.mul_(q_scale.unsqueeze(1))
    held = (rows.labels >= 0) & (rows.labels < policy.vocab)
    index = rows.labels.clamp(0, policy.vocab - 1)
    label_rows = (policy.products.operand(policy.weight[index]) if policy.operand_weight is None
                  else policy.operand_weight[index]).to(p.dtype)
    slope = torch.where(held, slope_at(stats[StatRow.LABEL_LOGIT], opts), torch.zeros((), dtype=p.dtype,
                                                                                         device=p.device))
    j = label_rows.mul_(slope.unsqueeze(1))
    if vocab_slice is not None:
        summed = torch.stack([p, j] + ([] if q is None else [q]))
        torch.distributed.all_reduce(summed, group=vocab_slice.group)
        p, j = summed[0].div_(stats[StatRow.SUM].unsqueeze(1)), summed[1]
        q = None if q is None else summed[2].div_(ref_stats[RefRow.SUM].unsqueeze(1))
    j = j.sub_(p)
    if q is None:
        return j, None
    return j, p.sub_(q)


def formed_hidden_grads(state: ForwardState, with_kl: bool) -> bool:
    """Whether a frozen head's forward formed every gradient its backward can be asked for (``J``, and ``K`` where
    the KL is an output): the backward then reads neither the hidden states nor the head."""
    return state.hidden_grads is not None and (state.hidden_grads[1] is not None or not with_kl)


def frozen_head_backward(state: ForwardState, grad_logp, grad_kl, like: tuple) -> torch.Tensor:
    """A frozen head's ``dhidden`` (``like``: the hidden states' ``(shape, dtype)``) from the ``J`` (and ``K``) its
    forward formed: a per-token scale, no GEMM, no head."""
    rows = state.rows
    g, g_kl = upstream(rows, grad_logp, grad_kl, state.products.out_dtype, state.lse.device)
    j, k = state.hidden_grads
    dh = j * g.unsqueeze(1)
    if g_kl is not None:
        dh.addcmul_(k, g_kl.unsqueeze(1))
    return rows.scatter(dh, *like)


def linear_backward(hidden, weight, bias, state: ForwardState, grad_logp, grad_kl, need: tuple[bool, bool, bool],
                    head_context=None):
    """Backward of the linear path from its forward's ``state``: ``(dhidden like hidden, dweight like weight, dbias
    like bias)``, ``None`` for a gradient not in ``need``; the reference is read only when ``grad_kl`` is given.
    ``head_context(weight, bias)``: a context entered around the backward's use of the head (a ZeRO-3 gather)."""
    if formed_hidden_grads(state, grad_kl is not None):
        return frozen_head_backward(state, grad_logp, grad_kl, (hidden.shape, hidden.dtype)), None, None
    rows, products = state.rows, state.products
    g, g_kl = upstream(rows, grad_logp, grad_kl, products.out_dtype, hidden.device)
    gathered = contextlib.nullcontext() if head_context is None else head_context(weight, bias)
    with no_autocast(hidden.device), gathered:
        policy = GemmSource.of(LinearHead(hidden, weight, bias), rows, products)
        ref_source = None if g_kl is None else GemmSource.of(state.ref, rows, state.ref_products)
        bw = Backward(state.lse, state.ref_lse, g, g_kl, state.opts, state.kernels)
        dh, dw, db = grad_all(rows, policy, ref_source, bw, need)
    if dh is not None and state.vocab_slice is not None:
        all_reduce_hidden_grad(dh, state.vocab_slice.group)
    return (None if dh is None else rows.scatter(dh, hidden.shape, hidden.dtype), dw,
            None if db is None else db.to(bias.dtype))


def head_products(hidden, weight, ref: LinearHead | None,
                  compute: tuple[torch.dtype, torch.dtype] | None = None) -> tuple[Products, Products | None]:
    """How each head's products are computed, in the statistics dtype of all the inputs. ``compute``: the policy's
    and the reference's product dtypes when they were decided earlier (an op runs outside the caller's autocast);
    by default :func:`product_dtype` under the autocast state of this call."""
    inputs = (hidden, weight) if ref is None else (hidden, weight, ref.hidden, ref.weight)
    sdt = statistics_dtype(*(t.dtype for t in inputs))
    if compute is None:
        compute = (product_dtype(hidden, weight), None if ref is None else product_dtype(ref.hidden, ref.weight))
    device_type = hidden.device.type
    products = Products.in_dtype(compute[0], device_type, sdt)
    report_products(products, hidden, weight)
    if ref is None:
        return products, None
    ref_products = Products.in_dtype(compute[1], device_type, sdt)
    report_products(ref_products, ref.hidden, ref.weight)
    return products, ref_products
