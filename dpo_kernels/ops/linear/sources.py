"""Tile sources: where the tile loop's logits tiles come from (:mod:`.loop` asks a source for each tile and never
asks what kind it is).

A source answers:

- ``vocab`` (its vocabulary width) and ``out_dtype`` (the tiles' dtype: the statistics dtype);
- ``scratch_bytes(device)``: bytes per tile entry it allocates as scratch, which the tile budget bounds;
- ``tile(n0, n1, v0, v1, labels) -> LogitsTile``: the tile of kept tokens ``n0:n1`` and columns ``v0:v1``, in a
  buffer the source owns (one flat scratch, grown to the largest tile it was asked for and reused: the first tile of
  a pass is the largest);
- ``fold(kernels, block, tile, stats, ref_tile, ref_stats, opts)``: fold its tile of ``block = (n0, n1, v0, v1)``
  (and the reference's) into the statistics of those tokens (the backend's ``fold``; a source that keeps more than
  the statistics, such as running accumulators, folds them here too);
- ``grad(kernels, block, labels, lse, g, ref_tile, ref_lse, g_kl, opts, out)``: ``dZ`` of the tile
  ``block = (n0, n1, v0, v1)``, written into ``out`` (``None``: over the tile itself) and returned, or ``None`` when
  the gradient filter skips the tile (the backend's ``grad`` over :meth:`tile`; a source that keeps something else
  than logits, such as scaled exponentials, forms ``dZ`` from what it keeps);
- ``batchable(v0)``: whether a backward may form chunk ``v0``'s ``dZ`` in a batched run with its neighbours
  (:func:`.loop.chunk_runs`), and then ``run_scratch(count, rows, cols, dtype)``: the ``[count, rows, cols]`` buffer
  the run's ``dZ`` goes into.

The head sources also carry the kept hidden rows, the weight and the
products the backward's ``dH``/``dW`` GEMMs use. The sources:

- :class:`GemmSource`: each tile is one GEMM of the kept hidden rows and a weight chunk (the recompute schedule);
- :class:`StoredSource`: the eager schedule's, keeping the tiles themselves; each tile is computed once into its slot of
  a :class:`TileStore`, and the source :meth:`~StoredSource.filled` returns reads it back;
- :class:`ScaledSource`: the eager schedule's for bf16 GEMM operands; each tile is kept as its softmax weights in fp16,
  half the bytes, from which its :meth:`~ScaledSource.grad` forms ``dZ``;
- :class:`AccumulatingSource`: a frozen head's; each tile is one GEMM, and its fold also accumulates the
  softmax-weighted head rows from which the forward forms the hidden states' gradient.

(Given logits need no source: their row kernels read each row once, a vocabulary slice of them too,
:func:`dpo_kernels.ops.logits_path.slice_forward`.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ...options import TokenOptions
from ..common import LinearHead
from .contract import (
    Accumulator,
    LogitsTile,
    RefRow,
    ScaledTile,
    StatRow,
    TileKernels,
    fold_shifted,
    scaled_grad,
)
from .kept import KeptTokens
from .plan import kept_tiles_count
from .products import Products


def operand_head(weight: torch.Tensor, products: Products) -> torch.Tensor | None:
    """The whole head as GEMM operands, converted once for a pass or a call (``None`` when the weight is its own
    operand already: no conversion to share). Costs ``V x D`` operand-dtype entries while it lives; saves one
    conversion of every chunk per token block (forward) and per group (eager schedule): an fp32 master head under
    bf16 autocast is read and rounded once per call instead of many times."""
    return products.operand(weight) if products.converts(weight) else None


class _Scratch:
    """One flat buffer reused by every tile of a pass, grown only when a larger tile is asked for."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.buffer = dtype, device, None

    def view(self, rows: int, cols: int) -> torch.Tensor:
        return self.entries(self.dtype, rows * cols).view(rows, cols)

    def entries(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The buffer's memory as ``count`` entries of ``dtype`` (grown when it holds fewer), e.g. half-dtype
        ``dZ`` tiles in an fp32 tile's bytes."""
        size = self.dtype.itemsize
        if self.buffer is None or self.buffer.numel() * size < count * dtype.itemsize or (
                self.buffer.numel() * size % dtype.itemsize):
            whole = -(-count * dtype.itemsize // size)
            # an even count: the memory is whole entries of a dtype twice as wide too
            self.buffer = torch.empty(whole + whole % 2, dtype=self.dtype, device=self.device)
        return self.buffer.view(dtype)[:count]


class _Folds:
    """The default ``fold`` and ``grad``: the backend's kernels over the source's tiles."""

    def fold(self, kernels: TileKernels, block: tuple[int, int, int, int], tile: LogitsTile, stats, ref_tile,
             ref_stats, opts: TokenOptions) -> None:
        kernels.fold(tile, stats, ref_tile, ref_stats, opts)

    def grad(self, kernels: TileKernels, block: tuple[int, int, int, int], labels: torch.Tensor, lse, g, ref_tile,
             ref_lse, g_kl, opts: TokenOptions, out: torch.Tensor | None) -> torch.Tensor | None:
        tile = self.tile(*block, labels)
        out = tile.logits if out is None else out
        return out if kernels.grad(tile, lse, g, ref_tile, ref_lse, g_kl, opts, out) else None


@dataclass
class GemmSource(_Folds):
    """One head: the kept hidden rows as GEMM operands ``h [n, D]``, the weight as given (each chunk converted when
    it is used, once per chunk), the bias in the statistics dtype, and how its products are computed."""

    h: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    products: Products
    operand_weight: torch.Tensor | None = None  # the whole head converted once (see operand_head), else None
    _chunk: tuple = field(default=(None, None), repr=False)
    _scratch: _Scratch | None = field(default=None, repr=False)

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products, operand_weight: torch.Tensor | None = None,
           **extra) -> "GemmSource":
        return cls(products.operand(rows.gather(head.hidden)), head.weight, products.bias(head.bias), products,
                   operand_weight, **extra)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def out_dtype(self) -> torch.dtype:
        return self.products.out_dtype

    def scratch_bytes(self, device: torch.device) -> int:
        return self.out_dtype.itemsize

    tiles_in_scratch = True  # its tiles are computed into its scratch (a store of kept tiles: into the store)

    def batchable(self, v0: int) -> bool:
        """Whether the backward may form chunk ``v0``'s ``dZ`` in a batched run (:func:`.loop.chunk_runs`): not
        where each tile is a GEMM into the one scratch."""
        return False

    def share_scratch_with(self, other: "GemmSource") -> None:
        """``other``'s tiles go into this source's scratch (each folded before the next tile is computed)."""
        if self._scratch is None:
            self._scratch = _Scratch(self.out_dtype, self.h.device)
        other._scratch = self._scratch

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        if self.operand_weight is not None:
            return self.operand_weight[v0:v1]
        if self._chunk[0] != (v0, v1):
            self._chunk = (None, None)  # the previous chunk's operands freed before the next one's are made
            self._chunk = ((v0, v1), self.products.operand(self.weight[v0:v1]))
        return self._chunk[1]

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor) -> LogitsTile:
        if self._scratch is None:
            self._scratch = _Scratch(self.out_dtype, self.h.device)
        return self._gemm_tile(n0, n1, v0, v1, labels, self._scratch.view(n1 - n0, v1 - v0))

    def _gemm_tile(self, n0, n1, v0, v1, labels, out: torch.Tensor) -> LogitsTile:
        bias = None if self.bias is None else self.bias[v0:v1]
        return LogitsTile(self.products.logits(self.h[n0:n1], self.weight_chunk(v0, v1), out), bias, v0,
                          labels[n0:n1])


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
        return self.buffer[start : start + (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)


@dataclass
class StoredSource(GemmSource):
    """A head whose tiles are kept (the eager schedule): until :meth:`filled`, each tile is computed by its GEMM into
    its slot of ``store``; the source :meth:`filled` returns reads them back, never recomputing. Its scratch is the
    store, which the tile budget counts only where the plan says so (:func:`.plan.kept_tiles_count`)."""

    store: TileStore | None = None
    kept: bool = False
    tiles_in_scratch = False

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products, buffer: torch.Tensor | None = None,
           operand_weight: torch.Tensor | None = None) -> "StoredSource":
        source = super().of(head, rows, products, operand_weight)
        source.store = TileStore(rows.n, source.vocab, products.out_dtype, source.h.device, buffer)
        return source

    def scratch_bytes(self, device: torch.device) -> int:
        return self.out_dtype.itemsize if kept_tiles_count(device) else 0

    def filled(self) -> "StoredSource":
        return dataclasses.replace(self, kept=True)

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor) -> LogitsTile:
        slot = self.store.slot(n0, n1, v0, v1)
        if not self.kept:
            return self._gemm_tile(n0, n1, v0, v1, labels, slot)
        return LogitsTile(slot, None if self.bias is None else self.bias[v0:v1], v0, labels[n0:n1])


# A placed chunk's offset is a multiple of this many store entries (128 bytes of fp16): its rows stay as aligned
# as the chunk width allows, wherever in the weight gradient's memory the chunk lies
STORE_ALIGN = 64


def _aligned(entries: int) -> int:
    return -(-entries // STORE_ALIGN) * STORE_ALIGN


@dataclass(frozen=True)
class StorePlacement:
    """Where each kept vocabulary chunk of a scaled store lives: ``in_grad`` (``v0 -> offset`` in the weight
    gradient's memory, in store entries) or ``own`` (``v0 -> offset`` in a buffer of ``own_entries`` allocated for
    the store); a chunk in neither is recomputed by the backward. ``part``: a chunk's entries for one head, aligned
    (the reference's weights, where kept, follow the policy's). ``operands``: ``v0 -> offset`` in the
    gradient's memory of the chunks whose converted head rows are kept too (``operand_part`` entries each),
    converted once for the call and read again by the backward's ``dH``."""

    in_grad: dict
    own: dict
    own_entries: int
    part: dict
    operands: dict = field(default_factory=dict)
    operand_part: dict = field(default_factory=dict)

    @property
    def kept_entries(self) -> int:
        return sum(self.part[v0] for v0 in (*self.in_grad, *self.own))

    @classmethod
    def of(cls, chunks, n: int, heads: int, grad_stride: int, grad_entries: int, room: int | None,
           operand_stride: int = 0) -> "StorePlacement":
        """``chunks``: the plan's ``[v0, v1)`` in the order the backward visits them; ``n`` kept tokens; ``heads``: 1,
        or 2 with the reference's weights; ``grad_stride``: the weight gradient's entries per vocabulary column (0:
        no gradient to hold the store), ``grad_entries`` in all; ``room``: the entries the store may allocate beside
        it (``None``: unbounded); ``operand_stride``: the converted head's entries per column where the policy's
        head is converted for its GEMMs (0: it is its own operand).

        The backward writes ``dW``'s rows ``v0:v1`` after it has read chunk ``v0:v1`` (and its operand rows) and
        every chunk before it, so a chunk may lie in the gradient's memory at or after its own rows' start
        (``offset >= v0 * grad_stride``): the rows it overlaps are written only after it is read. Chunks are placed
        there in order while they fit, the others in the store's own buffer within ``room``.

        Converted rows are worth far less a byte than the store (a kept column of the store saves ``4 D`` FLOPs of
        recomputed GEMM and 8 bytes of tile traffic per token, a kept converted row 3 bytes of conversion per
        operand byte), so they go only into the gradient's memory the store leaves, right after their chunk, chunk
        by chunk in order while every column the store alone keeps is still kept and nothing more lies beside
        it."""
        alone = cls._greedy(chunks, n, heads, grad_stride, grad_entries, room, operand_stride, frozenset())
        if not operand_stride or not grad_stride:
            return alone

        def with_rows(count: int) -> "StorePlacement | None":  # the rows of the first count chunks, if they fit
            placed = cls._greedy(chunks, n, heads, grad_stride, grad_entries, room, operand_stride,
                                 frozenset(v0 for v0, _ in chunks[:count]))
            fits = (len(placed.operands) == count and placed.kept_entries >= alone.kept_entries
                    and placed.own_entries <= alone.own_entries)
            return placed if fits else None

        # rows placed earlier only push later chunks further: whether the first m fit is monotone in m
        low, high, best = 0, len(chunks), alone
        while low < high:
            mid = (low + high + 1) // 2
            if (placed := with_rows(mid)) is None:
                high = mid - 1
            else:
                low, best = mid, placed
        return best

    @classmethod
    def _greedy(cls, chunks, n, heads, grad_stride, grad_entries, room, operand_stride, with_rows) -> "StorePlacement":
        """Chunks in order, in the gradient's memory while they fit, else beside within ``room``; the converted
        rows of the chunks in ``with_rows`` right after their chunk, in the gradient's memory only."""
        in_grad, own, part, operands, operand_part = {}, {}, {}, {}, {}
        cursor, used = 0, 0

        def in_gradient(v0: int, size: int) -> int | None:
            nonlocal cursor
            start = _aligned(max(cursor, v0 * grad_stride))
            if grad_stride and start + size <= grad_entries:
                cursor = start + size
                return start
            return None

        for v0, v1 in chunks:
            part[v0] = _aligned(n * (v1 - v0))
            size = heads * part[v0]
            if (start := in_gradient(v0, size)) is not None:
                in_grad[v0] = start
            elif room is None or used + size <= room:
                own[v0], used = used, used + size
            else:
                continue
            if operand_stride:
                operand_part[v0] = _aligned(operand_stride * (v1 - v0))
                if v0 in with_rows and (start := in_gradient(v0, operand_part[v0])) is not None:
                    operands[v0] = start
        return cls(in_grad, own, used, part, operands, operand_part)


class PlacedStore:
    """A scaled store's kept chunks, each a row-major ``[n, v1 - v0]`` matrix where :class:`StorePlacement` put it;
    the tile of tokens ``n0:n1`` is its rows ``n0:n1`` (contiguous), as in a :class:`TileStore`."""

    def __init__(self, n: int, chunks: dict) -> None:
        self.n, self.chunks = n, chunks

    def __contains__(self, v0: int) -> bool:
        return v0 in self.chunks

    def slot(self, n0: int, n1: int, v0: int, v1: int) -> torch.Tensor:
        return self.chunks[v0][n0:n1]


@dataclass
class ScaledSource(GemmSource):
    """The eager schedule's source for bf16 GEMM operands (:func:`.plan.kept_store_dtype`): each tile is one
    GEMM into fp32 scratch, folded, and kept as its softmax weights ``a = e^{z - s'} t'(x)`` (``fold_shifted``: in
    the fold's one pass over the tile) in a :class:`PlacedStore` of :data:`.plan.SCALED_STORE_DTYPE`, 2 bytes a
    logit, with ``s'`` (the token's shift after the tile: at most its running max, and below it by at most the fp16
    headroom, :func:`~.contract.shift_headroom`) per token and vocabulary chunk; for a TDPO loss the reference's
    ``e^{zr - s_r'} t'(x)`` beside, in ``ref_store``, so the reference source needs no store. After :meth:`filled`,
    :meth:`grad` forms ``dZ`` from them without a GEMM or a logit (MATH.md §1):

    ``dZ = -(g - g_kl) e^{s' - lse} a - g_kl e^{s_r' - lse_r} a_r``, and at the label's column the exact
    ``t'(z_y) (g (1 - p_y) + g_kl (p_y - q_y))`` from the label logits of the statistics.

    Backward traffic per logit: 2 bytes read (4 with the reference), ``dZ`` written in the operand dtype.

    Where the weight needs a gradient, the store lives in that gradient's memory as far as it goes
    (``grad_memory``, allocated by the forward; :class:`StorePlacement` says why the backward can write ``dW`` over
    it), and beside it within the budget's ``room``. A chunk kept nowhere (:meth:`keep`) is folded without keeping
    anything and recomputed by the backward (its GEMM and the backend's ``grad``, the reference's tile too for a KL
    gradient, from ``ref_source``), as the recompute schedule does, so that the GEMMs a store saves scale with the
    memory it is given."""

    store: PlacedStore | None = None
    ref_store: PlacedStore | None = None
    ref_source: "GemmSource | None" = None  # a KL gradient's reference, for the chunks that are recomputed
    maxes: dict = field(default_factory=dict)  # v0 -> [n] fp32: each token's shift after chunk v0's fold
    ref_maxes: dict = field(default_factory=dict)
    _last_shifts: dict = field(default_factory=dict, repr=False)  # n0 -> the last kept chunk's maxes rows n0:n1
    label_logits: tuple | None = None  # (z_y [n], zr_y [n] or None) after the forward: see filled
    _store_dtype: torch.dtype | None = field(default=None, repr=False)
    _with_ref: bool = field(default=False, repr=False)
    _grad_memory: torch.Tensor | None = field(default=None, repr=False)
    _operand_rows: dict = field(default_factory=dict, repr=False)  # v0 -> [v1 - v0, D] converted rows, kept
    _converted: set = field(default_factory=set, repr=False)  # the v0 of _operand_rows already written
    placement: str = ""  # what keep() placed where, as the debug log says it

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products, store_dtype: torch.dtype, with_ref: bool,
           grad_memory: torch.Tensor | None = None) -> "ScaledSource":
        """``with_ref``: keep the reference's weights too (a KL gradient); ``grad_memory``: the weight's gradient
        ``[V, D]`` (contiguous, written only by the backward), whose memory holds the store's first chunks, or
        ``None``. Nothing is kept until :meth:`keep` places the plan's chunks (and, for a converted head, its
        converted rows: no whole-head copy)."""
        source = super().of(head, rows, products)
        source._store_dtype, source._with_ref = store_dtype, with_ref
        source._grad_memory = None if grad_memory is None else grad_memory.view(-1).view(store_dtype)
        return source

    def keep(self, chunks, ref_source: "GemmSource | None", room_bytes: int | None = None) -> "ScaledSource":
        """Place the vocabulary ``chunks`` (``[v0, v1)`` pairs, in order): in the weight gradient's memory while they
        fit, else in the store's own buffer within ``room_bytes`` (``None``: every chunk), else nowhere;
        ``ref_source``: the reference head, whose tiles a KL gradient recomputes where a chunk is not kept."""
        n, device, heads = self.h.shape[0], self.h.device, 2 if self._with_ref else 1
        grad = self._grad_memory
        stride = 0 if grad is None else grad.numel() // self.vocab
        room = None if room_bytes is None else max(room_bytes, 0) // self._store_dtype.itemsize
        operand = self.products.operand_dtype
        converts = self.products.converts(self.weight)
        operand_stride = self.dim * operand.itemsize // self._store_dtype.itemsize if converts else 0
        placed = StorePlacement.of(chunks, n, heads, stride, 0 if grad is None else grad.numel(), room,
                                   operand_stride)
        own = (torch.empty(placed.own_entries, dtype=self._store_dtype, device=device) if placed.own_entries
               else None)
        stores, self._operand_rows, self._converted = ({}, {}), {}, set()
        for v0, v1 in chunks:
            memory, start = (grad, placed.in_grad[v0]) if v0 in placed.in_grad else (own, placed.own.get(v0))
            if start is None:
                continue
            for k in range(heads):
                offset = start + k * placed.part[v0]
                stores[k][v0] = memory[offset : offset + n * (v1 - v0)].view(n, v1 - v0)
            if v0 in placed.operands:
                offset = placed.operands[v0]
                rows = grad[offset : offset + operand_stride * (v1 - v0)]
                self._operand_rows[v0] = rows.view(operand).view(v1 - v0, self.dim)
        self.store = PlacedStore(n, stores[0])
        self.ref_store = PlacedStore(n, stores[1]) if self._with_ref else None
        every = len(stores[0]) == len(chunks)
        in_grad = sum(heads * placed.part[v0] for v0 in placed.in_grad) + sum(
            placed.operand_part[v0] for v0 in placed.operands)
        mib = self._store_dtype.itemsize / 2**20
        self.placement = (f"{sum(v1 - v0 for v0, v1 in chunks if v0 in stores[0])} of {self.vocab} columns kept, "
                          f"{in_grad * mib:.1f} MiB in the weight gradient's memory and "
                          f"{placed.own_entries * mib:.1f} MiB beside it"
                          + (f", with the converted head rows of {len(placed.operands)} of {len(chunks)} chunks"
                             if operand_stride else ""))
        self.ref_source = ref_source if self._with_ref and not every else None
        return self

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """Rows ``v0:v1`` as GEMM operands: where :meth:`keep` kept room for them, converted at their first use and
        kept for the backward's ``dH`` (the head converted once for the call)."""
        rows = self._operand_rows.get(v0)
        if rows is None or rows.shape[0] != v1 - v0:
            return super().weight_chunk(v0, v1)
        if v0 not in self._converted:
            self.products.operand_into(self.weight[v0:v1], rows)
            self._converted.add(v0)
        return rows

    def scratch_bytes(self, device: torch.device) -> int:
        """The fp32 tile, and the kept weights where the tile budget counts kept tiles (the CPU)."""
        kept = self._store_dtype.itemsize * (2 if self._with_ref else 1)
        return self.out_dtype.itemsize + (kept if kept_tiles_count(device) else 0)

    def _kept(self, v0: int) -> bool:
        return v0 in self.store

    def batchable(self, v0: int) -> bool:
        """A kept chunk (its ``dZ`` needs no fp32 tile) whose converted rows are not kept apart, so that a run's
        rows are one slice of the head as operands, ``[count, width, D]`` (:func:`.loop.grad_all`)."""
        return self._kept(v0) and v0 not in self._operand_rows

    def run_scratch(self, count: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """``[count, rows, cols]`` of ``dtype`` for the ``dZ`` of a run of kept chunks, in the fp32 tile scratch
        that kept chunks leave unused: two chunks' half-dtype ``dZ`` fill one fp32 tile's bytes."""
        if self._scratch is None:
            self._scratch = _Scratch(self.out_dtype, self.h.device)
        return self._scratch.entries(dtype, count * rows * cols).view(count, rows, cols)

    def fold(self, kernels: TileKernels, block: tuple[int, int, int, int], tile: LogitsTile, stats, ref_tile,
             ref_stats, opts: TokenOptions) -> None:
        n0, n1, v0, _ = block
        if not self._kept(v0):  # recomputed by the backward: nothing kept
            super().fold(kernels, block, tile, stats, ref_tile, ref_stats, opts)
            return
        # each kept chunk's shifts are its own rows of maxes, which the kernel writes from the last kept chunk's
        # (-inf before the first): no running copy to keep
        heads = 1 if self.ref_store is None else 2
        if n0 not in self._last_shifts:
            self._last_shifts[n0] = torch.full((heads, n1 - n0), float("-inf"), dtype=stats.dtype,
                                               device=stats.device).unbind(0)
        last = self._last_shifts[n0]
        ref_weights = None if self.ref_store is None else self.ref_store.slot(*block)
        shift = Accumulator(None, last[0], self._chunk_shifts(self.maxes, v0, stats)[n0:n1])
        ref_shift = None if ref_weights is None else Accumulator(
            None, last[1], self._chunk_shifts(self.ref_maxes, v0, stats)[n0:n1])
        fold_shifted(kernels, tile, stats, ref_tile, ref_stats, opts, self.store.slot(*block), ref_weights, shift,
                     ref_shift)
        self._last_shifts[n0] = tuple(a.new_shift for a in (shift, ref_shift) if a is not None)

    def _chunk_shifts(self, maxes: dict, v0: int, stats: torch.Tensor) -> torch.Tensor:
        if v0 not in maxes:
            maxes[v0] = torch.empty(self.store.n, dtype=stats.dtype, device=stats.device)
        return maxes[v0]

    def filled(self, stats: torch.Tensor, ref_stats: torch.Tensor | None) -> "ScaledSource":
        """The source the backward reads, with the label logits of the forward's statistics (after a vocabulary-
        parallel combine: the rank that holds a label's column has its logit). The forward's fp32 tile scratch (its
        own, shared with the reference's tiles, and the KL reference's) is let go: whatever runs between the forward
        and the backward (a reference model's forward, the rest of the network) does not find it held; the backward
        makes one where it needs it (a recomputed chunk, a run's ``dZ``)."""
        for scratch in (self._scratch, None if self.ref_source is None else self.ref_source._scratch):
            if scratch is not None:
                scratch.buffer = None
        ref_label = None if self.ref_store is None else ref_stats[RefRow.LABEL_LOGIT]
        return dataclasses.replace(self, label_logits=(stats[StatRow.LABEL_LOGIT], ref_label))

    def tile(self, n0: int, n1: int, v0: int, v1: int, labels: torch.Tensor) -> LogitsTile:
        if self.label_logits is not None and self._kept(v0):
            raise RuntimeError("a filled ScaledSource keeps softmax weights, not logits: its grad reads them")
        return super().tile(n0, n1, v0, v1, labels)

    def grad(self, kernels: TileKernels, block: tuple[int, int, int, int], labels: torch.Tensor, lse, g, ref_tile,
             ref_lse, g_kl, opts: TokenOptions, out: torch.Tensor | None) -> torch.Tensor:
        n0, n1, v0, v1 = block
        if not self._kept(v0):  # the recompute schedule's tile: its GEMM (and the reference's), the backend's grad
            ref_tile = None if g_kl is None else self.ref_source.tile(n0, n1, v0, v1, labels)
            return super().grad(kernels, block, labels, lse, g, ref_tile, ref_lse, g_kl, opts, out)
        if out is None:  # dZ in the statistics dtype (operands widened, the CPU): the fp32 tile scratch holds it
            out = self._scratch.view(n1 - n0, v1 - v0)
        tile_labels = labels[n0:n1]
        tile = ScaledTile(self.store.slot(*block), self.maxes[v0][n0:n1], v0, tile_labels,
                          self.label_logits[0][n0:n1])
        ref = None
        if g_kl is not None:
            ref = ScaledTile(self.ref_store.slot(*block), self.ref_maxes[v0][n0:n1], v0, tile_labels,
                             self.label_logits[1][n0:n1])
        scaled_grad(kernels, tile, lse, g, ref, ref_lse, g_kl, opts, out)
        return out


@dataclass
class AccumulatingSource(GemmSource):
    """A frozen head (no gradient for the weight or the bias): besides folding each tile, its fold accumulates, per
    token, ``P = sum_v e^{z_v - s} t'(x_v) W_v`` (``t'`` the logit transform's slope at the raw logit ``x``) and,
    for a KL gradient, ``Q = sum_v e^{zr_v - s_r} t'(x_v) W_v`` with the reference's weights, each an fp32
    ``[n, D]`` :class:`~.contract.Accumulator` kept at a per-token shift ``s`` that trails the running max and moves
    only when the max outgrows it (``fold_shifted``), as flash attention keeps its output. Brought to the final
    maxima and divided by the final sums, they give the gradient of the log-probs and of the KL with respect to the
    hidden states without a backward GEMM (:func:`.loop.hidden_grads`). Cost: one more GEMM per tile (``2 n D V``
    for ``P``, as many for ``Q``) in place of the backward's recompute and ``dH`` GEMMs (``4 n D V``)."""

    p: Accumulator | None = None
    q: Accumulator | None = None
    over_tile: bool = False  # the weights overwrite their tile (see of)
    _weights: tuple | None = field(default=None, repr=False)

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products, operand_weight: torch.Tensor | None = None,
           with_q: bool = False, kernels: TileKernels | None = None) -> "AccumulatingSource":
        """``kernels``: the backend's; where the weights are in the tile's dtype and its ``fold_shifted`` may
        write them over the tile (none fused: the fallback reads each row before writing it; or one that says
        ``fold_shifted_in_place``), they overwrite the tile they come from, else they take a scratch of their own."""
        source = super().of(head, rows, products, operand_weight)
        source.over_tile = (products.operand_dtype == source.out_dtype
                            and (kernels is None or kernels.fold_shifted is None or kernels.fold_shifted_in_place))
        shape, sdt, device = (rows.n, source.dim), products.out_dtype, source.h.device

        def accumulator() -> Accumulator:
            return Accumulator(torch.zeros(shape, dtype=sdt, device=device),
                               torch.full((rows.n,), float("-inf"), dtype=sdt, device=device))

        source.p = accumulator()
        source.q = accumulator() if with_q else None
        return source

    def scratch_bytes(self, device: torch.device) -> int:
        """The tile, and its weights in the GEMM operand dtype unless they overwrite it (a fused ``fold_shifted``
        may read a tile row again after writing its weights)."""
        weights = 0 if self.over_tile else self.products.operand_bytes * (1 if self.q is None else 2)
        return self.out_dtype.itemsize + weights

    def _weight_buffers(self, tile: LogitsTile, ref_tile: LogitsTile | None):
        if self.over_tile:
            return tile.logits, None if self.q is None else ref_tile.logits
        if self._weights is None:
            self._weights = (_Scratch(self.products.operand_dtype, self.h.device),
                             _Scratch(self.products.operand_dtype, self.h.device))
        shape = tile.logits.shape
        return self._weights[0].view(*shape), None if self.q is None else self._weights[1].view(*shape)

    def fold(self, kernels: TileKernels, block: tuple[int, int, int, int], tile: LogitsTile, stats, ref_tile,
             ref_stats, opts: TokenOptions) -> None:
        n0, n1, v0, v1 = block
        weights, ref_weights = self._weight_buffers(tile, ref_tile)
        p = _rows(self.p, n0, n1)
        q = None if self.q is None else _rows(self.q, n0, n1)
        fold_shifted(kernels, tile, stats, ref_tile, ref_stats, opts, weights, ref_weights, p, q)
        chunk = self.weight_chunk(v0, v1)
        self.products.accumulate(p.values, weights, chunk)
        if q is not None:
            self.products.accumulate(q.values, ref_weights, chunk)


def _rows(acc: Accumulator, n0: int, n1: int) -> Accumulator:
    return Accumulator(acc.values[n0:n1], acc.shift[n0:n1])
