"""Tile sources: where the tile loop's logits tiles come from (:mod:`.loop` asks a source for each tile and never
asks what kind it is).

A source answers:

- ``vocab`` (its vocabulary width) and ``out_dtype`` (the tiles' dtype: the statistics dtype);
- ``scratch_bytes(device)``: bytes per tile entry it allocates as scratch, which the tile budget bounds;
- ``tile(n0, n1, v0, v1, labels) -> LogitsTile``: the tile of kept tokens ``n0:n1`` and columns ``v0:v1``, in a
  buffer the source owns (one flat scratch, grown to the largest tile it was asked for and reused: the first tile of
  a pass is the largest);
- ``fold(kernels, tile, stats, ref_tile, ref_stats, opts)``: fold one of its tiles into the statistics (the backend's
  ``fold``; a source that keeps more than the statistics, such as running accumulators, folds them here too);
- ``grad(kernels, block, labels, lse, g, ref_tile, ref_lse, g_kl, opts, out)``: ``dZ`` of the tile
  ``block = (n0, n1, v0, v1)``, written into ``out`` (``None``: over the tile itself) and returned, or ``None`` when
  the gradient filter skips the tile (the backend's ``grad`` over :meth:`tile`; a source that keeps something else
  than logits, such as scaled exponentials, forms ``dZ`` from what it keeps).

The head sources (:class:`GemmSource`, :class:`StoredSource`) also carry the kept hidden rows, the weight and the
products the backward's ``dH``/``dW`` GEMMs use. The two sources:

- :class:`GemmSource`: each tile is one GEMM of the kept hidden rows and a weight chunk (the recompute schedule);
- :class:`StoredSource`: the eager schedule's; each tile is computed once into its slot of a :class:`TileStore`,
  and the source :meth:`~StoredSource.filled` returns reads it back.

(Given logits need no source: their row kernels read each row once, a vocabulary slice of them too,
:func:`dpo_kernels.ops.logits_path.slice_forward`.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ...options import TokenOptions
from ..common import LinearHead
from .contract import LogitsTile, TileKernels
from .kept import KeptTokens
from .plan import kept_tiles_count
from .products import Products


class _Scratch:
    """One flat buffer reused by every tile of a pass, grown only when a larger tile is asked for."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.buffer = dtype, device, None

    def view(self, rows: int, cols: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols, dtype=self.dtype, device=self.device)
        return self.buffer[: rows * cols].view(rows, cols)


class _Folds:
    """The default ``fold`` and ``grad``: the backend's kernels over the source's tiles."""

    def fold(self, kernels: TileKernels, tile: LogitsTile, stats, ref_tile, ref_stats, opts: TokenOptions) -> None:
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
    _chunk: tuple = field(default=(None, None), repr=False)
    _scratch: _Scratch | None = field(default=None, repr=False)

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products, **extra) -> "GemmSource":
        return cls(products.operand(rows.gather(head.hidden)), head.weight, products.bias(head.bias), products,
                   **extra)

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

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        if self._chunk[0] != (v0, v1):
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

    @classmethod
    def of(cls, head: LinearHead, rows: KeptTokens, products: Products,
           buffer: torch.Tensor | None = None) -> "StoredSource":
        source = super().of(head, rows, products)
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
