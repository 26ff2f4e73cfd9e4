"""The ``torch`` backend: chunked PyTorch, memory-bounded, runs on any device. It is the fallback of every dispatch.

What it materialises:

- From logits: per tile of ``token_chunk_size`` tokens, an fp32 copy of that tile's logits and its softmax. The
  forward keeps only the per-token log-sum-exp (``O(N)``) for the backward, which recomputes the softmax tile by
  tile and writes the one ``[R, T, V]`` gradient the autograd contract requires.
- From hidden states: tiles of ``token_chunk_size x vocab_chunk_size`` logits, folded into per-token online
  statistics (FORMULAS.md §1) and dropped. The backward recomputes each tile and accumulates ``dH`` and ``dW``
  (and ``db``) in fp32 (fp64 for fp64 inputs), casting to the parameter dtype once at the end. Peak extra memory is
  ``O(N + tile)`` plus the fp32 weight-gradient accumulator; ``[N, V]`` is never built.

Matrix products run in the statistics dtype (operands upcast per tile) so that the forward and the backward see
bitwise the same logits and no bf16 rounding enters the accumulation. The Triton and C++ backends are the fast paths.

Every function takes ``[R, T, ...]`` inputs whose leading dimensions the caller has collapsed; a tensor whose
``R`` and ``T`` dimensions cannot be merged without a copy (``logits[:, :-1]``) is walked one row at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from ..options import TokenOptions, statistics_dtype
from .common import LinearHead, kl_outputs, split_labels
from .inplace import mark_logits_overwritten, refuse_leaf_logits
from .transform import transform_backward, transform_logits

# Elements of one fp32 working tile; a few such temporaries are alive at once. 8 MiB on CPU (cache-sized); 32 MiB on
# accelerators, where fewer, larger tiles mean fewer kernel launches.
_TILE_ELEMENTS = {"cpu": 1 << 21}
_DEFAULT_TILE_ELEMENTS = 1 << 23
# Tokens per tile on the linear path; the vocabulary width is then chosen to fill the tile budget.
_LINEAR_TOKEN_CHUNK = 1024
_LINEAR_TILE_ELEMENTS = 1 << 21


def default_token_chunk(vocab: int, device: torch.device) -> int:
    """Tokens per tile from logits: as many rows of ``vocab`` fp32 values as fit the device's tile budget."""
    return max(1, _TILE_ELEMENTS.get(device.type, _DEFAULT_TILE_ELEMENTS) // vocab)


def default_linear_chunks(num_tokens: int, vocab: int) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` of the linear path's tile."""
    tokens = max(1, min(num_tokens, _LINEAR_TOKEN_CHUNK))
    return tokens, max(1, min(vocab, _LINEAR_TILE_ELEMENTS // tokens))


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
) -> torch.Tensor | None:
    """``dL/dz = g (onehot - p) + g_kl (p - q)`` for one tile, with ``p = exp(z - lse)``, ``q = exp(ref_z - ref_lse)``.

    ``label_col [n]`` is the label's column inside the tile and ``label_hit [n]`` says whether the label falls in it
    (``None``: always). ``g`` and ``g_kl`` are 0 at masked tokens, which makes their rows exactly 0. With
    ``filter_eps``, returns ``None`` when every ``|p - onehot|`` (and ``|p - q|``) of the tile is below it.
    """
    p = torch.exp(z - lse.unsqueeze(1))
    hit = torch.ones_like(g) if label_hit is None else label_hit.to(g.dtype)
    q = torch.exp(ref_z - ref_lse.unsqueeze(1)) if g_kl is not None else None
    if filter_eps is not None:
        deviation = p.scatter_add(1, label_col.unsqueeze(1), -hit.unsqueeze(1)).abs_().amax()
        if q is not None:
            deviation = torch.maximum(deviation, (p - q).abs_().amax())
        if deviation.item() < filter_eps:
            return None
    coeff = g if g_kl is None else g - g_kl
    grad = p.mul_(-coeff.unsqueeze(1))
    if q is not None:
        grad.sub_(q.mul_(g_kl.unsqueeze(1)))
    grad.scatter_add_(1, label_col.unsqueeze(1), (g * hit).unsqueeze(1))
    return grad


def _kl_terms(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``q (log q - log p)`` elementwise; an underflowed ``q = 0`` contributes exactly 0 (xlogy semantics)."""
    q = ref_logprobs.exp()
    return torch.where(q > 0, q * (ref_logprobs - logprobs), torch.zeros((), dtype=q.dtype, device=q.device))


# --------------------------------------------------------------------------------------------- from logits


def _logits_grad_buffer(logits: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """Where the logits' gradient goes: the logits themselves with ``inplace_backward``, else a new tensor."""
    if opts.inplace_backward:
        return logits
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _finish_logits_grad(grad: torch.Tensor, logits: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    if opts.inplace_backward:
        mark_logits_overwritten(logits)
    return grad


def _forward_logits_tile(x: torch.Tensor, index: torch.Tensor, opts: TokenOptions, sdt: torch.dtype):
    z = transform_logits(x.to(sdt), opts)
    lse = torch.logsumexp(z, dim=-1)
    return z, lse, z.gather(1, index.unsqueeze(1)).squeeze(1) - lse


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        shape, sdt = logits.shape, statistics_dtype(logits.dtype)
        index, mask = split_labels(labels.reshape(-1), opts.ignore_index)
        rows = TokenRows(logits)
        chunk = opts.token_chunk_size or default_token_chunk(shape[-1], logits.device)
        logp = torch.empty(index.numel(), dtype=sdt, device=logits.device)
        lse = torch.empty_like(logp)
        for s, e in token_ranges(shape, chunk, rows):
            _, lse[s:e], logp[s:e] = _forward_logits_tile(rows.rows(s, e), index[s:e], opts, sdt)
        ctx.save_for_backward(logits, index, mask, lse)
        ctx.opts = opts
        return _zeros_where_masked(logp, mask).view(shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: torch.Tensor):
        logits, index, mask, lse = ctx.saved_tensors
        opts, shape, sdt = ctx.opts, logits.shape, lse.dtype
        g = _zeros_where_masked(grad_logp.reshape(-1).to(sdt), mask)
        grad = _logits_grad_buffer(logits, opts)
        rows, grad_rows = TokenRows(logits), TokenRows(grad)
        for s, e in token_ranges(shape, opts.token_chunk_size or default_token_chunk(shape[-1], logits.device), rows):
            x = rows.rows(s, e).to(sdt)
            dz = _logit_grad(transform_logits(x, opts), lse[s:e], g[s:e], index[s:e], None)
            grad_rows.rows(s, e).copy_(transform_backward(x, dz, opts))
        return _finish_logits_grad(grad, logits, opts), None, None


class _TokenLogprobsAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, opts: TokenOptions):
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        shape, sdt = logits.shape, statistics_dtype(logits.dtype)
        index, mask = split_labels(labels.reshape(-1), opts.ignore_index)
        rows, ref_rows = TokenRows(logits), TokenRows(ref_logits)
        n = index.numel()
        logp, lse, ref_logp, ref_lse, kl = (torch.empty(n, dtype=sdt, device=logits.device) for _ in range(5))
        for s, e in token_ranges(shape, opts.token_chunk_size or default_token_chunk(shape[-1], logits.device), rows, ref_rows):
            z, lse[s:e], logp[s:e] = _forward_logits_tile(rows.rows(s, e), index[s:e], opts, sdt)
            ref_z, ref_lse[s:e], ref_logp[s:e] = _forward_logits_tile(ref_rows.rows(s, e), index[s:e], opts, sdt)
            kl[s:e] = _kl_terms(ref_z - ref_lse[s:e].unsqueeze(1), z - lse[s:e].unsqueeze(1)).sum(-1)
        ctx.save_for_backward(logits, ref_logits, index, mask, lse, ref_lse)
        ctx.opts = opts
        masked = (_zeros_where_masked(x, mask) for x in (logp, ref_logp, kl))
        return kl_outputs(ctx, *masked, shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: torch.Tensor, _grad_ref_logp: torch.Tensor, grad_kl: torch.Tensor):
        logits, ref_logits, index, mask, lse, ref_lse = ctx.saved_tensors
        opts, shape, sdt = ctx.opts, logits.shape, lse.dtype
        g = _zeros_where_masked(grad_logp.reshape(-1).to(sdt), mask)
        g_kl = _zeros_where_masked(grad_kl.reshape(-1).to(sdt), mask)
        grad = _logits_grad_buffer(logits, opts)
        rows, ref_rows, grad_rows = TokenRows(logits), TokenRows(ref_logits), TokenRows(grad)
        for s, e in token_ranges(shape, opts.token_chunk_size or default_token_chunk(shape[-1], logits.device), rows, ref_rows):
            x = rows.rows(s, e).to(sdt)
            ref_z = transform_logits(ref_rows.rows(s, e).to(sdt), opts)
            dz = _logit_grad(
                transform_logits(x, opts), lse[s:e], g[s:e], index[s:e], None, g_kl[s:e], ref_z, ref_lse[s:e]
            )
            grad_rows.rows(s, e).copy_(transform_backward(x, dz, opts))
        return _finish_logits_grad(grad, logits, opts), None, None, None


# --------------------------------------------------------------------------------------------- from hidden states


def _head_tile(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    """Raw logits ``h @ weight[v0:v1].T (+ bias[v0:v1])`` of one tile, in ``h``'s (statistics) dtype."""
    w = weight[v0:v1].to(h.dtype)
    if bias is None:
        return h @ w.T
    return torch.addmm(bias[v0:v1].to(h.dtype), h, w.T)


def _label_in_tile(index: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    hit = (index >= v0) & (index < v1)
    return (index - v0).clamp_(0, v1 - v0 - 1), hit


class _OnlineStats:
    """Running max ``m``, rescaled sum ``s`` and label logit of one token block, folded over vocabulary tiles."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.m = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.label_logit = torch.zeros(n, dtype=dtype, device=device)

    def fold(self, z: torch.Tensor, label_col: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """Fold tile ``z [n, v]``; returns ``exp(z - m_new)`` and the factor that rescaled the old sums."""
        m_new = torch.maximum(self.m, z.amax(dim=1))
        rescale = torch.exp(self.m - m_new)
        e = torch.exp(z - m_new.unsqueeze(1))
        self.s = self.s * rescale + e.sum(dim=1)
        self.m = m_new
        self.label_logit = torch.where(hit, z.gather(1, label_col.unsqueeze(1)).squeeze(1), self.label_logit)
        return e, rescale

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


def _linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    opts: TokenOptions,
    ref: LinearHead | None,
):
    """One pass over the vocabulary per token block. Returns flat ``(logp, lse, ref_logp, ref_lse, kl)`` and masks;
    the reference entries are ``None`` when ``ref`` is ``None``."""
    shape, sdt, device = hidden.shape, statistics_dtype(hidden.dtype), hidden.device
    vocab = weight.shape[0]
    index, mask = split_labels(labels.reshape(-1), opts.ignore_index)
    n = index.numel()
    tok_chunk, voc_chunk = _linear_chunks(opts, n, vocab)
    rows = TokenRows(hidden)
    ref_rows = TokenRows(ref.hidden) if ref is not None else None
    views = (rows,) if ref_rows is None else (rows, ref_rows)
    logp, lse = torch.empty(n, dtype=sdt, device=device), torch.empty(n, dtype=sdt, device=device)
    ref_logp = ref_lse = kl = None
    if ref is not None:
        ref_logp, ref_lse, kl = (torch.empty(n, dtype=sdt, device=device) for _ in range(3))
    for s, e in token_ranges(shape, tok_chunk, *views):
        h = rows.rows(s, e).to(sdt)
        policy = _OnlineStats(e - s, sdt, device)
        if ref is not None:
            ref_h = ref_rows.rows(s, e).to(sdt)
            reference = _OnlineStats(e - s, sdt, device)
            weighted = torch.zeros(e - s, dtype=sdt, device=device)  # sum_v e^{zr_v - mr} (zr_v - z_v)
        for v0 in range(0, vocab, voc_chunk):
            v1 = min(vocab, v0 + voc_chunk)
            label_col, hit = _label_in_tile(index[s:e], v0, v1)
            z = transform_logits(_head_tile(h, weight, bias, v0, v1), opts)
            policy.fold(z, label_col, hit)
            if ref is not None:
                ref_z = transform_logits(_head_tile(ref_h, ref.weight, ref.bias, v0, v1), opts)
                ref_e, rescale = reference.fold(ref_z, label_col, hit)
                tile_sum = torch.where(ref_e > 0, ref_e * (ref_z - z), torch.zeros((), dtype=sdt, device=device))
                weighted = weighted * rescale + tile_sum.sum(dim=1)
        lse[s:e] = policy.lse()
        logp[s:e] = policy.label_logit - lse[s:e]
        if ref is not None:
            ref_lse[s:e] = reference.lse()
            ref_logp[s:e] = reference.label_logit - ref_lse[s:e]
            kl[s:e] = weighted / reference.s - ref_lse[s:e] + lse[s:e]
    return logp, lse, ref_logp, ref_lse, kl, index, mask


def _linear_chunks(opts: TokenOptions, num_tokens: int, vocab: int) -> tuple[int, int]:
    tokens, voc = default_linear_chunks(num_tokens, vocab)
    return opts.token_chunk_size or tokens, opts.vocab_chunk_size or voc


def _linear_backward(ctx, g: torch.Tensor, g_kl: torch.Tensor | None):
    """Recompute every tile and accumulate ``dH``, ``dW`` and ``db`` (fp32/fp64 accumulators)."""
    hidden, weight, bias, index, _mask, lse, ref_lse = ctx.saved_tensors
    ref: LinearHead | None = ctx.ref if g_kl is not None else None
    opts, shape, sdt, device = ctx.opts, hidden.shape, lse.dtype, hidden.device
    vocab = weight.shape[0]
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_h = torch.empty(shape, dtype=hidden.dtype, device=device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=sdt, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=sdt, device=device) if need_b else None
    tok_chunk, voc_chunk = _linear_chunks(opts, index.numel(), vocab)
    rows, grad_rows = TokenRows(hidden), TokenRows(grad_h) if need_h else None
    ref_rows = TokenRows(ref.hidden) if ref is not None else None
    views = (rows,) if ref_rows is None else (rows, ref_rows)
    for s, e in token_ranges(shape, tok_chunk, *views):
        h = rows.rows(s, e).to(sdt)
        ref_h = ref_rows.rows(s, e).to(sdt) if ref is not None else None
        dh = torch.zeros(h.shape, dtype=sdt, device=device) if need_h else None
        for v0 in range(0, vocab, voc_chunk):
            v1 = min(vocab, v0 + voc_chunk)
            label_col, hit = _label_in_tile(index[s:e], v0, v1)
            x = _head_tile(h, weight, bias, v0, v1)
            ref_z = None
            if ref is not None:
                ref_z = transform_logits(_head_tile(ref_h, ref.weight, ref.bias, v0, v1), opts)
            dz = _logit_grad(
                transform_logits(x, opts),
                lse[s:e],
                g[s:e],
                label_col,
                hit,
                None if g_kl is None else g_kl[s:e],
                ref_z,
                None if ref_lse is None else ref_lse[s:e],
                opts.grad_filter_eps,
            )
            if dz is None:  # every |p - onehot| (and |p - q|) of this tile is below grad_filter_eps
                continue
            dx = transform_backward(x, dz, opts)
            if need_h:
                dh.addmm_(dx, weight[v0:v1].to(sdt))
            if need_w:
                grad_w[v0:v1].addmm_(dx.T, h)
            if need_b:
                grad_b[v0:v1] += dx.sum(dim=0)
        if need_h:
            grad_rows.rows(s, e).copy_(dh)
    return (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: TokenOptions):
        logp, lse, _, _, _, index, mask = _linear_forward(hidden, weight, bias, labels, opts, ref=None)
        ctx.save_for_backward(hidden, weight, bias, index, mask, lse, None)
        ctx.opts, ctx.ref = opts, None
        return _zeros_where_masked(logp, mask).view(hidden.shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        mask, lse = ctx.saved_tensors[4:6]
        g = _zeros_where_masked(grad_logp.reshape(-1).to(lse.dtype), mask)
        return (*_linear_backward(ctx, g, None), None, None)


class _LinearTokenLogprobsAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref: LinearHead, opts: TokenOptions):
        logp, lse, ref_logp, ref_lse, kl, index, mask = _linear_forward(hidden, weight, bias, labels, opts, ref)
        ctx.save_for_backward(hidden, weight, bias, index, mask, lse, ref_lse)
        ctx.opts, ctx.ref = opts, ref
        masked = (_zeros_where_masked(x, mask) for x in (logp, ref_logp, kl))
        return kl_outputs(ctx, *masked, hidden.shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        mask, sdt = ctx.saved_tensors[4], ctx.saved_tensors[5].dtype
        g = _zeros_where_masked(grad_logp.reshape(-1).to(sdt), mask)
        g_kl = _zeros_where_masked(grad_kl.reshape(-1).to(sdt), mask)
        return (*_linear_backward(ctx, g, g_kl), None, None, None)


# --------------------------------------------------------------------------------------------- backend interface


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    return _TokenLogprobs.apply(logits, labels, opts)


def token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions):
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
    return _TokenLogprobsAndKL.apply(logits, labels, ref_logits.detach(), opts)


def linear_token_logprobs(hidden, weight, bias, labels, opts: TokenOptions):
    """``hidden [R, T, D]``, ``weight [V, D]``, ``bias [V]`` or ``None`` -> ``logp [R, T]``."""
    return _LinearTokenLogprobs.apply(hidden, weight, bias, labels, opts)


def linear_token_logprobs_and_kl(hidden, weight, bias, ref: LinearHead, labels, opts: TokenOptions):
    """Policy head plus reference head -> ``(logp, ref_logp, kl)``; the reference receives no gradient."""
    ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    return _LinearTokenLogprobsAndKL.apply(hidden, weight, bias, labels, ref, opts)
