"""The ``torch`` backend: chunked PyTorch, memory-bounded, runs on any device. It is the fallback of every dispatch.

What it materialises:

- From logits (the row kernels of :mod:`dpo_kernels.ops.logits_path`): per tile of ``token_chunk_size`` tokens (else
  as many as ``tile_budget_mb`` holds), an fp32 copy of that tile's logits (and, in the backward, its softmax). The
  forward keeps only the per-token log-sum-exp (``O(N)``) for the backward, which recomputes the
  softmax tile by tile and writes the one ``[R, T, V]`` gradient the autograd contract requires (into the logits'
  own storage with ``inplace_backward``). Per logit and pass that is about 10 bytes of traffic in the forward
  (read half, write and read fp32) and 20 in the backward (read half, ``exp`` in place in fp32, one multiply written
  straight into the half gradient), against about 36 for log_softmax + gather + autograd.
- From hidden states: the linear path of :mod:`dpo_kernels.ops.linear` with this module's tile kernels
  (PyTorch ops over each fp32 logits tile). :data:`KERNELS` holds both.

Every function takes ``[R, T, ...]`` inputs whose leading dimensions the caller has collapsed; a tensor whose
``R`` and ``T`` dimensions cannot be merged without a copy (``logits[:, :-1]``) is walked one row at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..options import TokenOptions, statistics_dtype
from .backend import BackendKernels
from .common import kl_terms, nan_out_of_vocab, split_labels
from .linear.contract import LogitsTile, RefRow, StatRow, TileKernels, has_logging_rows
from .linear.plan import tile_budget_bytes
from .logits_path import LogitsKernels
from .transform import transform_backward, transform_logits

# Bytes of scratch per logit of a from-logits tile: its fp32 copy and one fp32 temporary (the softmax) are alive at
# once. The tile budget itself is the linear path's, ``tile_budget_mb`` (plan.default_tile_budget_mb by default).
_BYTES_PER_ENTRY = 8


def default_token_chunk(vocab: int, opts: TokenOptions, device: torch.device) -> int:
    """Tokens per tile from logits: as many rows of ``vocab`` entries as fit the tile budget (``token_chunk_size``
    when given)."""
    return opts.token_chunk_size or max(1, tile_budget_bytes(opts, device) // (vocab * _BYTES_PER_ENTRY))


class TokenRows:
    """A ``[R, T, K]`` tensor seen as ``N = R*T`` rows of ``K`` values, sliced into 2-D views without copying."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.seq_len = x.shape[1]
        try:
            self.flat: torch.Tensor | None = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end``; a range never crosses a sequence boundary unless ``self.flat`` exists."""
        if self.flat is not None:
            return self.flat[start:end]
        r, t = divmod(start, self.seq_len)
        return self.x[r, t : t + (end - start)]


def token_ranges(shape: torch.Size, chunk: int, *views: TokenRows) -> Iterator[tuple[int, int]]:
    """Ranges ``[start, end)`` over the ``R*T`` tokens, each at most ``chunk`` long, valid for every view."""
    num_rows, seq_len = shape[0], shape[1]
    if all(v.flat is not None for v in views):
        total = num_rows * seq_len
        for start in range(0, total, chunk):
            yield start, min(total, start + chunk)
        return
    for r in range(num_rows):
        for t in range(0, seq_len, chunk):
            yield r * seq_len + t, r * seq_len + min(seq_len, t + chunk)


def _zeros_where_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _logit_grad(
    z: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    label_col: torch.Tensor,
    label_hit: torch.Tensor | None,
    g_kl: torch.Tensor | None = None,
    ref_z: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
    filter_eps: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``dL/dz = g (onehot - p) + g_kl (p - q)`` for one tile, with ``p = exp(z - lse)``, ``q = exp(ref_z - ref_lse)``:
    a new fp32 tensor, or written into ``out`` (any float dtype; it may share storage with ``z``, which is read first).

    ``label_col [n]`` is the label's column inside the tile and ``label_hit [n]`` says whether the label falls in it
    (``None``: always). ``g`` and ``g_kl`` are 0 at masked tokens, which makes their rows exactly 0. With
    ``filter_eps``, returns ``None`` when every ``|p - onehot|`` (and ``|p - q|``) of the tile is below it.
    """
    p = torch.sub(z, lse.unsqueeze(1)).exp_()  # fp32 from a half z in one pass
    hit = torch.ones_like(g) if label_hit is None else label_hit.to(g.dtype)
    q = torch.sub(ref_z, ref_lse.unsqueeze(1)).exp_() if g_kl is not None else None
    if filter_eps is not None:
        deviation = p.scatter_add(1, label_col.unsqueeze(1), -hit.unsqueeze(1)).abs_().amax()
        if q is not None:
            deviation = torch.maximum(deviation, (p - q).abs_().amax())
        if deviation.item() < filter_eps:
            return None
    if q is None:
        p.scatter_add_(1, label_col.unsqueeze(1), -hit.unsqueeze(1))  # p - onehot
        coeff = -g.unsqueeze(1)
        return p.mul_(coeff) if out is None else torch.mul(p, coeff, out=out)
    grad = p.mul_((g_kl - g).unsqueeze(1)).sub_(q.mul_(g_kl.unsqueeze(1)))
    grad.scatter_add_(1, label_col.unsqueeze(1), (g * hit).unsqueeze(1))
    return grad if out is None else out.copy_(grad)


# --------------------------------------------------------------------------------------------- from logits


def _forward_logits_tile(x: torch.Tensor, index: torch.Tensor, opts: TokenOptions, sdt: torch.dtype):
    z = transform_logits(x.to(sdt), opts)
    lse = torch.logsumexp(z, dim=-1)
    lse = lse.masked_fill(lse == float("inf"), float("nan"))  # a +inf logit: no softmax (contract.finish_lse)
    return z, lse, z.gather(1, index.unsqueeze(1)).squeeze(1) - lse


def logits_forward(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions):
    """The from-logits ``forward`` kernel (:mod:`dpo_kernels.ops.logits_path`), a tile of tokens at a time."""
    shape = logits.shape
    sdt = statistics_dtype(logits.dtype, *(() if ref_logits is None else (ref_logits.dtype,)))
    index, mask = split_labels(labels, opts.ignore_index, shape[-1])
    views = (TokenRows(logits),) if ref_logits is None else (TokenRows(logits), TokenRows(ref_logits))
    n, device = index.numel(), logits.device
    logp, lse = torch.empty(n, dtype=sdt, device=device), torch.empty(n, dtype=sdt, device=device)
    ref_logp = ref_lse = kl = None
    if ref_logits is not None:
        ref_logp, ref_lse, kl = (torch.empty(n, dtype=sdt, device=device) for _ in range(3))
    for s, e in token_ranges(shape, default_token_chunk(shape[-1], opts, device), *views):
        z, lse[s:e], logp[s:e] = _forward_logits_tile(views[0].rows(s, e), index[s:e], opts, sdt)
        if ref_logits is not None:
            ref_z, ref_lse[s:e], ref_logp[s:e] = _forward_logits_tile(views[1].rows(s, e), index[s:e], opts, sdt)
            kl[s:e] = kl_terms(ref_z - ref_lse[s:e].unsqueeze(1), z - lse[s:e].unsqueeze(1)).sum(-1)

    def finished(x: torch.Tensor | None, by_label: bool = True) -> torch.Tensor | None:
        if x is None:
            return None
        if by_label:
            x = nan_out_of_vocab(x, labels, shape[-1], opts.ignore_index)
        return _zeros_where_masked(x, mask)

    # lse and ref_lse stay as computed at ignored tokens too: the backward's p = exp(z - lse) must stay <= 1 there,
    # where g = 0 makes the row exactly 0
    return finished(logp), lse, finished(ref_logp), ref_lse, finished(kl, False)


def logits_fold(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions,
                stats: torch.Tensor, ref_stats: torch.Tensor | None) -> None:
    """The from-logits ``fold`` kernel (:mod:`dpo_kernels.ops.logits_path`): the tile fold over a tile of tokens at a
    time, every column of their rows."""
    shape, sdt = logits.shape, stats.dtype
    views = (TokenRows(logits),) if ref_logits is None else (TokenRows(logits), TokenRows(ref_logits))
    for s, e in token_ranges(shape, default_token_chunk(shape[-1], opts, logits.device), *views):
        tiles = [LogitsTile(v.rows(s, e).to(sdt).contiguous(), None, 0, labels[s:e]) for v in views]
        fold_tile(tiles[0], stats[:, s:e], None if ref_logits is None else tiles[1],
                  None if ref_stats is None else ref_stats[:, s:e], opts)


@torch.no_grad()
def log_sum_sq_probs(logits: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``log sum_v p_v^2`` per token ``[R, T]`` from ``logits [R, T, V]`` (any layout), detached, fp32 (fp64 for
    fp64 logits), in the tiles of :func:`logits_forward`: the statistic WPO weights by when only logits are given."""
    shape = logits.shape
    out = torch.empty(shape[:2], dtype=statistics_dtype(logits.dtype), device=logits.device)
    rows, flat = TokenRows(logits), out.view(-1)
    for s, e in token_ranges(shape, default_token_chunk(shape[-1], opts, logits.device), rows):
        z = transform_logits(rows.rows(s, e).to(out.dtype), opts)
        flat[s:e] = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
    return out


def logits_backward(logits, ref_logits, labels, lse, ref_lse, g, g_kl, opts: TokenOptions, grad) -> None:
    """The from-logits ``backward`` kernel, tile by tile: the softmax recomputed (and the reference's only for a KL
    gradient), written straight into ``grad`` in its dtype; masked rows are exactly 0."""
    shape, sdt = logits.shape, lse.dtype
    index, mask = split_labels(labels, opts.ignore_index, shape[-1])
    held = (labels >= 0) & (labels < shape[-1])  # a label outside the row (another rank's slice) adds no one-hot
    masked = ~mask.view(-1, 1)
    use_ref = g_kl is not None
    rows, grad_rows = TokenRows(logits), TokenRows(grad)
    views = (rows, TokenRows(ref_logits)) if use_ref else (rows,)
    for s, e in token_ranges(shape, default_token_chunk(shape[-1], opts, logits.device), *views):
        x = rows.rows(s, e)
        kl_args = (g_kl[s:e], transform_logits(views[1].rows(s, e).to(sdt), opts), ref_lse[s:e]) if use_ref else ()
        if opts.is_identity_transform:  # straight from the half logits into the half gradient
            _logit_grad(x, lse[s:e], g[s:e], index[s:e], held[s:e], *kl_args, out=grad_rows.rows(s, e))
        else:
            xs = x.to(sdt)
            dz = _logit_grad(transform_logits(xs, opts), lse[s:e], g[s:e], index[s:e], held[s:e], *kl_args)
            grad_rows.rows(s, e).copy_(transform_backward(xs, dz, opts))
        # a masked row gets exactly 0 whatever its logits hold (g = 0 there, but 0 * NaN is NaN)
        grad_rows.rows(s, e).masked_fill_(masked[s:e], 0)


# --------------------------------------------------------------------------------------------- tile kernels


def _tile_z(tile: LogitsTile, opts: TokenOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, z)``: the raw logits with the bias, and after the transform."""
    x = tile.logits if tile.bias is None else tile.logits + tile.bias
    return x, transform_logits(x, opts)


def _label_column(tile: LogitsTile) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column, hit)``: each token's label column inside the tile (clamped) and whether the label is there."""
    width = tile.logits.shape[1]
    local = tile.labels - tile.v0
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


def _fold_rows(stats: torch.Tensor, z: torch.Tensor, column: torch.Tensor, hit: torch.Tensor):
    """Fold ``z [n, w]`` into ``stats`` rows (max, sum, label logit) in place; returns ``exp(z - max)`` and the
    factor that rescaled the earlier sums."""
    m, s, label = stats[StatRow.MAX], stats[StatRow.SUM], stats[StatRow.LABEL_LOGIT]
    m_new = torch.maximum(m, z.amax(dim=1))
    rescale = torch.exp(m - m_new)
    e = torch.exp(z - m_new.unsqueeze(1))
    s.mul_(rescale).add_(e.sum(dim=1))
    m.copy_(m_new)
    label.copy_(torch.where(hit, z.gather(1, column.unsqueeze(1)).squeeze(1), label))
    return e, rescale


def fold_tile(tile: LogitsTile, stats, ref: LogitsTile | None, ref_stats, opts: TokenOptions) -> None:
    """The ``fold`` kernel of :mod:`dpo_kernels.ops.linear.contract`, in PyTorch ops."""
    _, z = _tile_z(tile, opts)
    column, hit = _label_column(tile)
    e, rescale = _fold_rows(stats, z, column, hit)
    if has_logging_rows(stats):
        _fold_logging(stats, z, e, rescale, tile.labels - tile.v0)
    if ref is not None:
        _, zr = _tile_z(ref, opts)
        e_r, rescale = _fold_rows(ref_stats, zr, column, hit)
        terms = torch.where(e_r > 0, e_r * (zr - z), torch.zeros((), dtype=z.dtype, device=z.device))
        ref_stats[RefRow.WEIGHTED].mul_(rescale).add_(terms.sum(dim=1))


def _fold_logging(stats, z: torch.Tensor, e: torch.Tensor, rescale: torch.Tensor, label_local: torch.Tensor) -> None:
    """The :data:`LOGGING_ROWS` of ``stats`` for tile ``z`` with ``e = exp(z - m_new)``."""
    weighted, squares = stats[StatRow.WEIGHTED_LOGITS], stats[StatRow.SQUARES]
    logit_sum, before = stats[StatRow.LOGIT_SUM], stats[StatRow.MAX_BEFORE_LABEL]
    weighted.mul_(rescale).add_(torch.linalg.vecdot(e, z))
    squares.mul_(rescale * rescale).add_(torch.linalg.vecdot(e, e))
    logit_sum.add_(z.sum(dim=1))
    left = torch.arange(z.shape[1], device=z.device) < label_local.unsqueeze(1)
    before.copy_(torch.maximum(before, z.masked_fill(~left, float("-inf")).amax(dim=1)))


def grad_tile(tile: LogitsTile, lse, g, ref: LogitsTile | None, ref_lse, g_kl, opts: TokenOptions, out) -> bool:
    """The ``grad`` kernel of :mod:`dpo_kernels.ops.linear.contract`, in PyTorch ops."""
    x, z = _tile_z(tile, opts)
    column, hit = _label_column(tile)
    ref_z = None if ref is None else _tile_z(ref, opts)[1]
    direct = out if opts.is_identity_transform else None
    dz = _logit_grad(z, lse, g, column, hit, g_kl, ref_z, ref_lse, opts.grad_filter_eps, out=direct)
    if dz is None:
        return False
    if direct is None:
        out.copy_(transform_backward(x, dz, opts))
    return True


KERNELS = BackendKernels(logits=LogitsKernels(forward=logits_forward, backward=logits_backward, fold=logits_fold),
                         tiles=TileKernels(fold=fold_tile, grad=grad_tile))
