"""The one tile loop of the linear path and its autograd functions, shared by every tile-kernel backend.

``linear_token_stats(policy, ref, labels, opts, kernels)`` returns per-token log-probs of ``z = h W^T (+ b)``
(and, with a reference head, the reference log-probs and ``KL(ref || policy)``, MATH.md §1) without building
``[N, V]``:

- Ignored tokens (label ``ignore_index``: prompts, padding) are dropped before the first GEMM: the kept rows of the
  hidden states are gathered once (no copy when every token is kept and the rows are contiguous).
- Forward, token-major: for each token block and vocabulary chunk, one GEMM writes the fp32 logits tile (and the
  reference tile, same tokens and columns) and ``kernels.fold`` folds it into ``O(n)`` statistics. Only ``lse``
  (and ``ref_lse``) are saved for the backward.
- Backward, vocabulary-major: for each vocabulary chunk ``c``, recompute its tiles, ``kernels.grad`` forms ``dZ``
  in the GEMM operand dtype, ``dH += dZ W_c`` goes into one fp32 ``[n, D]`` accumulator, and ``dW_c = dZ^T H`` is
  written once with fp32 accumulation inside the GEMM and one rounding to the weight's dtype (through an fp32
  ``[vc, D]`` buffer only when the tokens are split into several blocks). There is no ``[V, D]`` fp32 buffer and
  no atomic over the vocabulary. The reference is recomputed only when the KL output received a gradient
  (``ctx.set_materialize_grads(False)``: an unused output arrives as ``None``).

This is the *recompute* schedule. :mod:`.eager` runs the same loop (:func:`fold_all`, :func:`grad_all`) for the fused
objectives, its tiles kept in a :class:`TileStore` from the forward instead of recomputed (:class:`StoredSide`).

With a :class:`~dpo_kernels.ops.vocab_parallel.VocabSlice` the head is this rank's slice of a vocabulary split
over a process group: the folded statistics are combined across the group before ``lse`` is formed, and ``dH`` is
all-reduced in the backward (:mod:`dpo_kernels.ops.vocab_parallel`). ``logits_token_stats`` runs the same loop over
given logits (a vocabulary-parallel slice of them), the tiles copied from the logits instead of computed by a GEMM.

Materialised beyond the inputs and the gradients themselves: the gathered kept rows ``[n, D]`` (operand dtype; only
when tokens are dropped or converted), the fp32 ``dH`` accumulator ``[n, D]``, the per-token statistics, and the
tiles of :mod:`plan` (at most ``tile_budget_mb``).

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
import dataclasses
from dataclasses import dataclass, field

import torch

from ...options import TokenOptions, statistics_dtype
from ..common import LinearHead, first_order_only, nan_out_of_vocab
from ..inplace import mark_logits_overwritten, refuse_leaf_logits
from ..vocab_parallel import VocabSlice, all_reduce_hidden_grad, combine
from .contract import (
    LOGGED_OUTPUTS, LogitsTile, RefRow, StatRow, TileKernels, finish_lse, logging_outputs, new_ref_stats, new_stats,
)
from .plan import TilePlan, kept_tiles_count, plan_tiles
from .products import Products, product_dtype, report_products


def linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions,
                       kernels: TileKernels, logging: bool = False, vocab_slice: VocabSlice | None = None,
                       head_context=None, kept_count: int | None = None):
    """``policy.hidden [R, T, D]``, ``policy.weight [V, D]``, ``labels [R, T]`` -> ``logp [R, T]``; with ``ref``
    (``hidden [R, T, D_ref]``, ``weight [V, D_ref]``) -> ``(logp, ref_logp, kl)``. fp32 statistics (fp64 when an
    input is fp64), exactly 0 at ignored tokens; only the policy receives gradients.

    With ``logging=True`` returns ``(that, logged)``: ``logged`` maps ``entropy``, ``log_sum_sq_probs``,
    ``mean_logits`` and ``is_top1`` (see :func:`contract.logging_outputs`) to ``[R, T]`` tensors computed in the same
    forward pass, not differentiable. With ``vocab_slice``, the heads are this rank's slices (``V = V_r``).

    ``head_context(weight, bias)``, when given, returns a context manager entered around the backward's use of the
    policy head: the forward runs inside the caller's gathering of a sharded head (ZeRO-3), the backward, which
    recomputes the logits later, must gather again. ``kept_count``: the number of labels that are not
    ``ignore_index``, when the caller has read it (:mod:`dpo_kernels.host_read`): the kept rows are then found with no
    host sync of their own."""
    if ref is not None:
        ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    outs = _LinearStats.apply(policy.hidden, policy.weight, policy.bias, labels, ref, opts, kernels, logging,
                              vocab_slice, head_context, kept_count)
    return _split_logged(outs, ref is not None, logging)


def logits_token_stats(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor,
                       opts: TokenOptions, kernels: TileKernels, vocab_slice: VocabSlice):
    """From this rank's slice of the logits ``[R, T, V_r]`` (and of the reference's): ``logp [R, T]`` or
    ``(logp, ref_logp, kl)``, equal on every rank of ``vocab_slice.group`` to one process with the whole logits."""
    ref_logits = None if ref_logits is None else ref_logits.detach()
    return _LogitsStats.apply(logits, labels, ref_logits, opts, kernels, vocab_slice)


def _split_logged(outs, with_ref: bool, logging: bool):
    if not logging:
        return outs
    main = 3 if with_ref else 1
    logged = dict(zip(LOGGED_OUTPUTS, outs[main:], strict=True))
    return (outs[:main] if with_ref else outs[0]), logged


class KeptTokens:
    """The tokens that are not ignored: ``kept`` flat indices into the ``R*T`` tokens (``None``: all of them), and
    their labels as columns of this rank's vocabulary (``label - offset``; outside ``[0, V_r)`` when another rank of a
    vocabulary-parallel group holds the label's column).

    ``count``: how many labels are not ``ignore_index``, when the caller has read it in its one host read
    (:mod:`dpo_kernels.host_read`); the indices are then ``torch.nonzero_static`` at that size, with no sync. Without
    it, ``nonzero`` reads the count itself (one host sync, before any GEMM)."""

    def __init__(self, labels: torch.Tensor, ignore_index: int, offset: int = 0, count: int | None = None) -> None:
        flat = labels.reshape(-1)
        self.total = flat.numel()
        if count == self.total:
            self.kept = None
        else:
            mask = flat != ignore_index
            kept = (mask.nonzero() if count is None else torch.nonzero_static(mask, size=count)).squeeze(1)
            self.kept = None if kept.numel() == self.total else kept
        self.labels = (flat if self.kept is None else flat[self.kept]).long() - offset
        self.n = self.labels.numel()

    def gather(self, x: torch.Tensor, start: int = 0, end: int | None = None, columns: slice = slice(None)):
        """``[R, T, K]`` -> kept rows ``start:end`` and ``columns`` of them, ``[end - start, k]`` (a view when all
        tokens are kept and the rows merge; else only those rows and columns are copied)."""
        end = self.n if end is None else end
        if self.kept is None:
            return x.reshape(-1, x.shape[-1])[start:end, columns]
        index = self.kept[start:end]
        try:
            return x.view(-1, x.shape[-1])[index, columns]
        except RuntimeError:  # rows that do not merge without a copy, e.g. hidden[:, :-1]
            return x[(*_token_index(index, x), columns)]

    def select(self, per_token: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A ``[R, T]`` per-token tensor (an upstream gradient) -> ``[n]`` at the kept tokens, contiguous."""
        flat = per_token.reshape(-1)
        return (flat if self.kept is None else flat[self.kept]).to(dtype).contiguous()

    def scatter(self, values: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """``[n, ...]`` kept values -> ``shape`` (``R*T`` tokens first) in ``dtype``, exactly 0 at ignored tokens."""
        if self.kept is None:
            return values.to(dtype).view(shape)
        out = torch.zeros((self.total, *values.shape[1:]), dtype=dtype, device=values.device)
        return out.index_copy_(0, self.kept, values.to(dtype)).view(shape)


@dataclass
class Side:
    """One head as the tile loop sees it: the kept hidden rows as GEMM operands ``[n, D]``, the weight as given
    (each chunk converted when it is used, once per chunk), the bias in the statistics dtype, and how its products
    are computed."""

    h: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    products: Products
    _chunk: tuple = field(default=(None, None), repr=False)

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products) -> "Side":
        return cls(products.operand(rows.gather(head.hidden)), head.weight, products.bias(head.bias), products)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def out_dtype(self) -> torch.dtype:
        return self.products.out_dtype

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        if self._chunk[0] != (v0, v1):
            self._chunk = ((v0, v1), self.products.operand(self.weight[v0:v1]))
        return self._chunk[1]

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor, scratch: torch.Tensor) -> LogitsTile:
        """The logits tile of kept tokens ``n0:n1`` and columns ``v0:v1``, written by one GEMM into ``scratch``."""
        bias = None if self.bias is None else self.bias[v0:v1]
        out = scratch[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
        return LogitsTile(self.products.logits(self.h[n0:n1], self.weight_chunk(v0, v1), out), bias, v0, labels[n0:n1])


class TileStore:
    """Every tile of ``n`` kept tokens over a ``vocab``-wide head, kept from the forward for the eager schedule's
    gradient: ``n * vocab`` entries in the statistics dtype, vocabulary-chunk-major. Chunk ``[v0, v1)`` of a plan is
    one row-major ``[n, v1 - v0]`` matrix at ``v0 * n``, and the tile of tokens ``n0:n1`` is its rows ``n0:n1``
    (contiguous at ``v0 * n + n0 * (v1 - v0)``), so a backward may read the tiles of any token blocks of the same
    vocabulary chunks, the full height of a chunk at once included (:func:`.plan.plan_stored_backward`)."""

    def __init__(self, n: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 buffer: torch.Tensor | None = None) -> None:
        """``buffer``: a flat buffer of at least ``n * vocab`` entries to reuse (e.g. one per call for every group of
        the eager schedule), else a new one."""
        self.n = n
        self.buffer = torch.empty(n * vocab, dtype=dtype, device=device) if buffer is None else buffer[: n * vocab]

    def slot(self, n0: int, n1: int, v0: int, v1: int) -> torch.Tensor:
        start = v0 * self.n + n0 * (v1 - v0)
        return self.buffer[start : start + (n1 - n0) * (v1 - v0)]


@dataclass
class StoredSide(Side):
    """A head whose tiles are kept (the eager schedule): until :meth:`filled`, :meth:`tile` computes each tile into
    its slot of ``store``; the side :meth:`filled` returns reads them back, never recomputing."""

    store: TileStore | None = None
    kept: bool = False

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products,
           buffer: torch.Tensor | None = None) -> "StoredSide":
        side = super().of(head, rows, products)
        side.store = TileStore(rows.n, side.vocab, products.out_dtype, side.h.device, buffer)
        return side

    def filled(self) -> "StoredSide":
        return dataclasses.replace(self, kept=True)

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor, scratch: torch.Tensor) -> LogitsTile:
        slot = self.store.slot(n0, n1, v0, v1)
        if not self.kept:
            return super().tile(n0, n1, v0, v1, labels, slot)
        bias = None if self.bias is None else self.bias[v0:v1]
        return LogitsTile(slot.view(n1 - n0, v1 - v0), bias, v0, labels[n0:n1])


@dataclass(frozen=True)
class _LogitsSide:
    """Given logits ``[R, T, V]`` as the tile loop's source: a tile is a copy of kept rows and columns, in the
    statistics dtype."""

    logits: torch.Tensor
    rows: KeptTokens
    out_dtype: torch.dtype

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1]

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor, scratch: torch.Tensor) -> LogitsTile:
        out = scratch[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
        out.copy_(self.rows.gather(self.logits, n0, n1, slice(v0, v1)))
        return LogitsTile(out, None, v0, labels[n0:n1])


def _scratch(plan: TilePlan, n: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One flat buffer for the largest tile of ``plan``, reused by every tile of a pass: the scratch never grows
    past the budget and no allocator sees a request per tile."""
    return torch.empty(min(n, plan.tokens) * min(vocab, plan.vocab), dtype=dtype, device=device)


def no_autocast(device: torch.device):
    """Inside the loop every dtype is explicit (:class:`Products`); nothing may be autocast again, in the forward or
    in a backward that runs under an autocast context."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return contextlib.nullcontext()


def fold_all(rows: KeptTokens, policy, ref, opts: TokenOptions, kernels: TileKernels, logging: bool,
             device: torch.device, plan: TilePlan | None = None):
    """Forward, token-major, over the tiles of ``policy`` (and ``ref``): ``(stats [3, n] (7 with the logging rows),
    ref_stats [4, n] or None)`` after one pass over this rank's vocabulary. A :class:`StoredSide` writes each tile
    into its store instead of the scratch (``plan`` then fixes the tiles the backward reads back)."""
    n, vocab, sdt = rows.n, policy.vocab, policy.out_dtype
    stats = new_stats(n, sdt, device, logging=logging)
    ref_stats = None if ref is None else new_ref_stats(n, sdt, device)
    if plan is None:
        per_entry = sdt.itemsize * (1 if ref is None else 2)
        dim = policy.weight.shape[1] if isinstance(policy, Side) else None  # from logits: no head, no dH
        plan = plan_tiles(n, vocab, per_entry, opts, device, dim=dim)
    scratch = None if isinstance(policy, StoredSide) else _scratch(plan, n, vocab, sdt, device)
    ref_scratch = None if ref is None or isinstance(ref, StoredSide) else _scratch(plan, n, vocab, sdt, device)
    for n0, n1 in plan.token_blocks(n):
        for v0, v1 in plan.vocab_chunks(vocab):
            tile = policy.tile(n0, n1, v0, v1, rows.labels, scratch)
            ref_tile = None if ref is None else ref.tile(n0, n1, v0, v1, rows.labels, ref_scratch)
            kernels.fold(tile, stats[:, n0:n1], ref_tile, None if ref is None else ref_stats[:, n0:n1], opts)
    return stats, ref_stats


def finish_forward(stats, ref_stats, rows: KeptTokens, shape: torch.Size, vocab_slice: VocabSlice | None, vocab: int,
                    logging: bool):
    """Combine across a vocabulary-parallel group, then ``(outs, lse, ref_lse)``: ``outs`` is ``[logp]`` (then
    ``ref_logp``, ``kl`` with a reference, then the logged statistics), each scattered to ``shape``; ``lse`` (and
    ``ref_lse``) ``[n]`` at the kept tokens are what a backward needs."""
    if vocab_slice is not None:
        combine(stats, ref_stats, vocab_slice.group)
    sdt = stats.dtype
    lse = finish_lse(stats[StatRow.MAX], stats[StatRow.SUM])
    ref_lse = None if ref_stats is None else finish_lse(ref_stats[RefRow.MAX], ref_stats[RefRow.SUM])
    offset, total = (0, vocab) if vocab_slice is None else (vocab_slice.start, vocab_slice.total)
    labels = rows.labels + offset  # global ids: one with check_labels=False may be out of range (NaN, never a crash)
    outs = [rows.scatter(nan_out_of_vocab(stats[StatRow.LABEL_LOGIT] - lse, labels, total), shape, sdt)]
    if ref_stats is not None:
        outs += [
            rows.scatter(nan_out_of_vocab(ref_stats[RefRow.LABEL_LOGIT] - ref_lse, labels, total), shape, sdt),
            rows.scatter(ref_stats[RefRow.WEIGHTED] / ref_stats[RefRow.SUM] - ref_lse + lse, shape, sdt),
        ]
    if logging:
        logged = logging_outputs(stats, lse, total)
        outs += [rows.scatter(logged[name], shape, logged[name].dtype) for name in LOGGED_OUTPUTS]
    return outs, lse, ref_lse


def _returned(ctx, outs: list, with_ref: bool, logging: bool):
    """The autograd functions' outputs: everything but ``logp`` and ``kl`` is not differentiable."""
    frozen = ([outs[1]] if with_ref else []) + (outs[-len(LOGGED_OUTPUTS):] if logging else [])
    if frozen:
        ctx.mark_non_differentiable(*frozen)
    return outs[0] if len(outs) == 1 else tuple(outs)


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


@dataclass(frozen=True)
class _GradScratch:
    """The reused buffers of a backward pass: the fp32 tile, the reference's (with a KL gradient), and ``dZ`` in
    the GEMM operand dtype (``None``: ``dZ`` overwrites the fp32 tile)."""

    tile: torch.Tensor
    ref_tile: torch.Tensor | None
    dz: torch.Tensor | None

    @classmethod
    def of(cls, plan: TilePlan, n: int, vocab: int, sdt: torch.dtype, dz_dtype: torch.dtype | None, with_ref: bool,
           device: torch.device, stored: tuple[bool, bool] = (False, False)) -> "_GradScratch":
        """``stored``: whether the policy's and the reference's tiles are read from a :class:`TileStore` (no tile
        buffer then)."""
        return cls(None if stored[0] else _scratch(plan, n, vocab, sdt, device),
                   _scratch(plan, n, vocab, sdt, device) if with_ref and not stored[1] else None,
                   None if dz_dtype is None else _scratch(plan, n, vocab, dz_dtype, device))


def _logits_grad(policy, ref, rows: KeptTokens, block: tuple[int, int, int, int], bw: Backward,
                 scratch: _GradScratch) -> torch.Tensor | None:
    """``dZ [n1 - n0, v1 - v0]`` of the recomputed tile ``block = (n0, n1, v0, v1)`` in ``scratch.dz``'s dtype (or
    over the fp32 tile without it); ``None`` when the gradient filter skips the tile."""
    n0, n1, v0, v1 = block
    tile = policy.tile(n0, n1, v0, v1, rows.labels, scratch.tile)
    ref_tile = None if ref is None else ref.tile(n0, n1, v0, v1, rows.labels, scratch.ref_tile)
    dz = tile.logits if scratch.dz is None else scratch.dz[: tile.logits.numel()].view(tile.logits.shape)
    kept = bw.kernels.grad(tile, bw.lse[n0:n1], bw.g[n0:n1], ref_tile, None if ref is None else bw.ref_lse[n0:n1],
                           None if bw.g_kl is None else bw.g_kl[n0:n1], bw.opts, dz)
    return dz if kept else None


def _token_index(flat_index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices -> ``(row, position)`` indices of an ``[R, T, ...]`` tensor, for any memory layout."""
    return flat_index // x.shape[1], flat_index % x.shape[1]


def scratch_bytes_per_entry(sdt: torch.dtype, ref, products: Products, device: torch.device,
                            stored: tuple[bool, bool] = (False, False)) -> int:
    """Tile bytes per entry that the tile budget bounds: the fp32 tile and the reference's (a tile ``stored`` in a
    :class:`TileStore` only where :func:`.plan.kept_tiles_count`), and ``dZ`` in the GEMM operand dtype when that
    differs."""
    if kept_tiles_count(device):
        stored = (False, False)
    tiles = sdt.itemsize * ((0 if stored[0] else 1) + (0 if ref is None or stored[1] else 1))
    return max(1, tiles + (0 if products.operand_dtype == sdt else products.operand_bytes))


def grad_all(rows: KeptTokens, policy: Side, ref: Side | None, bw: Backward, need: tuple[bool, bool, bool],
             plan: TilePlan | None = None, dw_into: torch.Tensor | None = None):
    """Backward of the linear path, vocabulary-major: ``(dH [n, D] fp32, dW [V, D] in the weight's dtype, db [V]
    fp32)``, ``None`` for each gradient not in ``need``. ``dw_into``: an fp32 ``[V, D]`` buffer the weight gradient
    is accumulated into (and returned), for a gradient summed over several calls; ``plan``: the forward's, for
    stored tiles."""
    need_dh, need_dw, need_db = need
    products, weight = policy.products, policy.weight
    n, (vocab, dim), device, sdt = rows.n, weight.shape, policy.h.device, products.out_dtype
    dh = torch.zeros((n, policy.h.shape[1]), dtype=sdt, device=device) if need_dh else None
    accumulate = need_dw and dw_into is not None
    dw = (dw_into if accumulate else torch.empty((vocab, dim), dtype=weight.dtype, device=device)) if need_dw else None
    db = torch.zeros(vocab, dtype=sdt, device=device) if need_db else None
    dz_dtype = None if products.operand_dtype == sdt else products.operand_dtype
    if plan is None:
        plan = plan_tiles(n, vocab, scratch_bytes_per_entry(sdt, ref, products, device), bw.opts, device, dim=dim)
    one_block = plan.single_token_block(n)
    stored = (isinstance(policy, StoredSide), isinstance(ref, StoredSide))
    scratch = _GradScratch.of(plan, n, vocab, sdt, dz_dtype, ref is not None, device, stored)
    for v0, v1 in plan.vocab_chunks(vocab):
        dw_acc, dw_written = None, False
        for n0, n1 in plan.token_blocks(n):
            dz = _logits_grad(policy, ref, rows, (n0, n1, v0, v1), bw, scratch)
            if dz is None:  # grad_filter_eps: every |p - onehot| (and |p - q|) of the tile is negligible
                continue
            if need_dh:
                products.accumulate(dh[n0:n1], dz, policy.weight_chunk(v0, v1))
            if accumulate:
                products.accumulate(dw[v0:v1], dz.T, policy.h[n0:n1])
            elif need_dw:
                if one_block and products.write(dw[v0:v1], dz.T, policy.h[n0:n1]):
                    dw_written = True
                else:
                    if dw_acc is None:
                        dw_acc = torch.zeros((v1 - v0, dim), dtype=sdt, device=device)
                    products.accumulate(dw_acc, dz.T, policy.h[n0:n1])
            if need_db:
                db[v0:v1] += dz.sum(dim=0, dtype=sdt)
        if need_dw and not accumulate and not dw_written:
            dw[v0:v1].copy_(dw_acc) if dw_acc is not None else dw[v0:v1].zero_()
    return dh, dw, db


# --------------------------------------------------------------------------------------------- the two passes
# Plain functions over tensors, shared by the autograd functions below and the torch.library ops of ``library_ops``.


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


def linear_forward(hidden, weight, bias, labels, ref: LinearHead | None, products: Products,
                   ref_products: Products | None, opts: TokenOptions, kernels: TileKernels, logging: bool = False,
                   vocab_slice: VocabSlice | None = None, kept_count: int | None = None):
    """Forward of the linear path with the products of :func:`head_products`: ``(outs, state)``, ``outs`` as
    :func:`finish_forward` returns them; ``kept_count`` as for :class:`KeptTokens`."""
    rows = KeptTokens(labels, opts.ignore_index, 0 if vocab_slice is None else vocab_slice.start, kept_count)
    with no_autocast(hidden.device):
        policy = Side.of(LinearHead(hidden, weight, bias), rows, products)
        ref_side = None if ref is None else Side.of(ref, rows, ref_products)
        stats, ref_stats = fold_all(rows, policy, ref_side, opts, kernels, logging, hidden.device)
    outs, lse, ref_lse = finish_forward(stats, ref_stats, rows, labels.shape, vocab_slice, weight.shape[0], logging)
    return outs, ForwardState(rows, lse, ref_lse, opts, kernels, ref, products, ref_products, vocab_slice)


def linear_backward(hidden, weight, bias, state: ForwardState, grad_logp, grad_kl, need: tuple[bool, bool, bool],
                    head_context=None):
    """Backward of the linear path from its forward's ``state``: ``(dhidden like hidden, dweight like weight, dbias
    like bias)``, ``None`` for a gradient not in ``need``; the reference is read only when ``grad_kl`` is given."""
    rows, products = state.rows, state.products
    g, g_kl = upstream(rows, grad_logp, grad_kl, products.out_dtype, hidden.device)
    gathered = contextlib.nullcontext() if head_context is None else head_context(weight, bias)
    with no_autocast(hidden.device), gathered:
        policy = Side.of(LinearHead(hidden, weight, bias), rows, products)
        ref_side = None if g_kl is None else Side.of(state.ref, rows, state.ref_products)
        bw = Backward(state.lse, state.ref_lse, g, g_kl, state.opts, state.kernels)
        dh, dw, db = grad_all(rows, policy, ref_side, bw, need)
    if dh is not None and state.vocab_slice is not None:
        all_reduce_hidden_grad(dh, state.vocab_slice.group)
    return (None if dh is None else rows.scatter(dh, hidden.shape, hidden.dtype), dw,
            None if db is None else db.to(bias.dtype))


def head_products(hidden, weight, ref: LinearHead | None,
                  compute: tuple[torch.dtype, torch.dtype] | None = None) -> tuple[Products, Products | None]:
    """How each head's products are computed, in the statistics dtype of all the inputs. ``compute``: the policy's
    and the reference's product dtypes when they were decided earlier (a ``torch.library`` op runs outside the
    caller's autocast); by default :func:`product_dtype` under the autocast state of this call."""
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


def logits_forward(logits, labels, ref_logits, opts: TokenOptions, kernels: TileKernels,
                   vocab_slice: VocabSlice | None = None):
    """Forward over given logits: ``(outs, state)``."""
    rows = KeptTokens(labels, opts.ignore_index, 0 if vocab_slice is None else vocab_slice.start)
    sdt = _logits_statistics_dtype(logits, ref_logits)
    policy = _LogitsSide(logits, rows, sdt)
    ref = None if ref_logits is None else _LogitsSide(ref_logits, rows, sdt)
    stats, ref_stats = fold_all(rows, policy, ref, opts, kernels, False, logits.device)
    outs, lse, ref_lse = finish_forward(stats, ref_stats, rows, labels.shape, vocab_slice, logits.shape[-1], False)
    return outs, ForwardState(rows, lse, ref_lse, opts, kernels, vocab_slice=vocab_slice)


def logits_backward(logits, ref_logits, state: ForwardState, grad_logp, grad_kl) -> torch.Tensor:
    """The logits' gradient (0 at ignored tokens), written into ``logits`` itself with ``opts.inplace_backward``."""
    rows, opts = state.rows, state.opts
    sdt = _logits_statistics_dtype(logits, ref_logits)
    g, g_kl = upstream(rows, grad_logp, grad_kl, sdt, logits.device)
    policy = _LogitsSide(logits, rows, sdt)
    ref = None if g_kl is None else _LogitsSide(ref_logits, rows, sdt)
    if opts.inplace_backward:  # every element is read into a tile before its gradient overwrites it
        grad = logits
        if rows.kept is not None:
            ignored = torch.ones(rows.total, dtype=torch.bool, device=logits.device)
            ignored[rows.kept] = False
            grad[_token_index(ignored.nonzero().squeeze(1), logits)] = 0
    else:
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    n, vocab = rows.n, logits.shape[-1]
    dz_dtype = None if logits.dtype == sdt else logits.dtype
    per_entry = sdt.itemsize * (1 if ref is None else 2) + (0 if dz_dtype is None else logits.dtype.itemsize)
    plan = plan_tiles(n, vocab, per_entry, opts, logits.device)
    scratch = _GradScratch.of(plan, n, vocab, sdt, dz_dtype, ref is not None, logits.device)
    bw = Backward(state.lse, state.ref_lse, g, g_kl, opts, state.kernels)
    for n0, n1 in plan.token_blocks(n):
        r, t = _token_index(torch.arange(n0, n1, device=logits.device) if rows.kept is None else rows.kept[n0:n1],
                            logits)
        for v0, v1 in plan.vocab_chunks(vocab):
            dz = _logits_grad(policy, ref, rows, (n0, n1, v0, v1), bw, scratch)
            grad[r, t, v0:v1] = 0 if dz is None else dz
    return grad


def _logits_statistics_dtype(logits, ref_logits) -> torch.dtype:
    return statistics_dtype(logits.dtype, *(() if ref_logits is None else (ref_logits.dtype,)))


# --------------------------------------------------------------------------------------------- autograd


class _LinearStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref: LinearHead | None, opts: TokenOptions, kernels: TileKernels,
                logging: bool, vocab_slice: VocabSlice | None, head_context, kept_count: int | None):
        ctx.set_materialize_grads(False)  # an unused output (the KL) then arrives as None in the backward
        products, ref_products = head_products(hidden, weight, ref)
        outs, ctx.state = linear_forward(hidden, weight, bias, labels, ref, products, ref_products, opts, kernels,
                                         logging, vocab_slice, kept_count)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.head_context = head_context
        return _returned(ctx, outs, ref is not None, logging)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, *grad_rest):
        hidden, weight, bias = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        grad_kl = grad_rest[1] if ctx.state.ref is not None else None
        if (grad_logp is None and grad_kl is None) or not any(need):
            return (None,) * 11
        grads = linear_backward(hidden, weight, bias, ctx.state, grad_logp, grad_kl, need, ctx.head_context)
        return (*grads, None, None, None, None, None, None, None, None)


class _LogitsStats(torch.autograd.Function):
    """The tile loop over given logits (this rank's vocabulary slice): tiles are copies of the logits in the
    statistics dtype, folded, combined across the group; the backward writes each ``dZ`` tile into the logits'
    gradient (0 at ignored tokens)."""

    @staticmethod
    def forward(ctx, logits, labels, ref_logits, opts: TokenOptions, kernels: TileKernels, vocab_slice: VocabSlice):
        ctx.set_materialize_grads(False)
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        outs, ctx.state = logits_forward(logits, labels, ref_logits, opts, kernels, vocab_slice)
        ctx.save_for_backward(logits, ref_logits)
        return _returned(ctx, outs, ref_logits is not None, False)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, *grad_rest):
        logits, ref_logits = ctx.saved_tensors
        grad_kl = grad_rest[1] if ref_logits is not None else None
        if grad_logp is None and grad_kl is None:
            return (None,) * 6
        grad = logits_backward(logits, ref_logits, ctx.state, grad_logp, grad_kl)
        if ctx.state.opts.inplace_backward:
            mark_logits_overwritten(logits)
        return grad, None, None, None, None, None
