"""The tokens the tile loop works on: every token whose label is not ``ignore_index``.

Ignored tokens (prompts, padding) are dropped before the first GEMM; :class:`KeptTokens` gathers their rows once,
picks an upstream gradient at them, and scatters per-token results back (exactly 0 at ignored tokens).
"""

from __future__ import annotations

import torch


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

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, T, K]`` -> the kept rows ``[n, K]`` (a view when all tokens are kept and the rows merge; else only
        the kept rows are copied)."""
        if self.kept is None:
            return x.reshape(-1, x.shape[-1])
        try:
            return x.view(-1, x.shape[-1])[self.kept]
        except RuntimeError:  # rows that do not merge without a copy, e.g. hidden[:, :-1]
            return x[token_index(self.kept, x)]

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


def token_index(flat_index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices -> ``(row, position)`` indices of an ``[R, T, ...]`` tensor, for any memory layout."""
    return flat_index // x.shape[1], flat_index % x.shape[1]
