"""Triton kernels from hidden states: ``linear_token_logprobs`` and ``linear_token_logprobs_and_kl``.

The logits ``z = h W^T (+ b)`` are never written to memory.

Forward: the grid is (token blocks) x (vocabulary splits). A program computes ``BLOCK_N x BLOCK_V`` logits tiles
with ``tl.dot`` over ``BLOCK_D`` slices of the hidden dimension (fp32 accumulation), applies bias and transform, and
folds each tile into per-token online statistics for its slice of the vocabulary; with a reference head it computes
the reference tile for the same tokens in the same program and also keeps ``m_r``, ``s_r`` and
``w = sum_v e^{zr_v - m_r} (zr_v - z_v)``. Each program writes its partial statistics to ``[splits, N]`` buffers,
merged on the host by an ``O(N * splits)`` log-sum-exp combine. Splitting the vocabulary keeps enough programs in
flight when ``N`` is small.

Backward: the grid is (token blocks) x (vocabulary blocks). Each program recomputes its tile (and the reference
tile), forms ``dZ = g (onehot - p) + g_kl (p - q)`` on chip, chains it through the transform and adds
``dZ W`` into an fp32 ``dH [N, D]`` and ``dZ^T H`` into an fp32 ``dW [V, D]`` (and ``db``) with atomic adds, one
``BLOCK_D`` slice at a time. Why atomics: a second pass or a split reduction would need each program to own a
``[BLOCK, D]`` accumulator (1 MiB at D=4096, far beyond registers) or to recompute the logits once per ``D`` slice;
atomics keep the backward at three tile products (recompute, dH, dW) with fp32 accumulation whatever the input
dtype. Contention is bounded by the tile sizes (``V / BLOCK_V`` adds per ``dH`` element, ``N / BLOCK_N`` per ``dW``
element) and cut further by the optional gradient filter.

Gradient filter (``grad_filter_eps``, off by default): a tile whose every ``|p - onehot|`` (and ``|p - q|`` with a
KL gradient) is below ``eps`` adds nothing. Each skipped entry of ``dZ`` is at most ``eps (|g| + |g_kl|)`` before
the transform's derivative (at most ``|logit_scale| / temperature``), which bounds the error of ``dH`` and ``dW``.

Design goal (GPU benchmarks, not tests): at N=8192, D=4096, V=128256 in bf16, forward+backward no slower than TRL
1.16's chunked path and at most 0.9x the naive path's time, with at most 64 MB of extra memory (the fp32 ``dW``
accumulator excepted, which every implementation that accumulates in fp32 needs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...options import TokenOptions
from ..common import LinearHead, kl_outputs, upstream_grad, upstream_grads
from .config import TileConfig, autotune_enabled, tile_candidates, tile_config
from .jit_helpers import transform, transform_grad
from .launch import dot_precision, transform_args, upcast_dot


@triton.jit
def _logits_tile(
    h_ptr, h_row_offsets, h_stride_d, row_mask,
    w_ptr, cols, w_stride_v, w_stride_d, col_mask,
    hidden,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Raw logits ``h[rows] @ w[cols].T`` of one tile, fp32 accumulation."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    w_col_offsets = cols.to(tl.int64) * w_stride_v
    for d0 in range(0, hidden, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < hidden
        h = tl.load(h_ptr + h_row_offsets[:, None] + ds[None, :] * h_stride_d,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_col_offsets[None, :] + ds[:, None] * w_stride_d,
                    mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        if UPCAST_DOT:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_forward_kernel(
    h_ptr, h_stride_r, h_stride_t, h_stride_d, w_ptr, w_stride_v, w_stride_d, b_ptr,
    rh_ptr, rh_stride_r, rh_stride_t, rh_stride_d, rw_ptr, rw_stride_v, rw_stride_d, rb_ptr,
    labels_ptr, part_m_ptr, part_s_ptr, part_label_ptr, part_mr_ptr, part_sr_ptr, part_label_r_ptr, part_w_ptr,
    n_tokens, seq_len, vocab, hidden, ref_hidden, vocab_per_split,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    rows64 = rows.to(tl.int64)
    r, t = rows64 // seq_len, rows64 % seq_len
    h_offsets = r * h_stride_r + t * h_stride_t
    rh_offsets = r * rh_stride_r + t * rh_stride_t
    labels = tl.load(labels_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(vocab, v_begin + vocab_per_split)

    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    m_r = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s_r = tl.zeros((BLOCK_N,), tl.float32)
    zr_label = tl.zeros((BLOCK_N,), tl.float32)
    w_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _logits_tile(h_ptr, h_offsets, h_stride_d, row_mask, w_ptr, cols, w_stride_v, w_stride_d, col_mask,
                         hidden, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = transform(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        z_masked = tl.where(col_mask[None, :], z, -float("inf"))
        hit = cols[None, :].to(tl.int64) == labels[:, None]
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z_masked, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_masked - m_new[:, None]), axis=1)
        m = m_new
        if HAS_REF:
            xr = _logits_tile(rh_ptr, rh_offsets, rh_stride_d, row_mask, rw_ptr, cols, rw_stride_v, rw_stride_d,
                              col_mask, ref_hidden, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
            if HAS_REF_BIAS:
                xr += tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
            zr_label += tl.sum(tl.where(hit, zr, 0.0), axis=1)
            zr_masked = tl.where(col_mask[None, :], zr, -float("inf"))
            m_r_new = tl.maximum(m_r, tl.max(zr_masked, axis=1))
            rescale = tl.exp(m_r - m_r_new)
            e_r = tl.exp(zr_masked - m_r_new[:, None])
            s_r = s_r * rescale + tl.sum(e_r, axis=1)
            w_sum = w_sum * rescale + tl.sum(tl.where(e_r > 0, e_r * (zr - z), 0.0), axis=1)
            m_r = m_r_new

    out = pid_s.to(tl.int64) * n_tokens + rows64
    tl.store(part_m_ptr + out, m, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    tl.store(part_label_ptr + out, z_label, mask=row_mask)
    if HAS_REF:
        tl.store(part_mr_ptr + out, m_r, mask=row_mask)
        tl.store(part_sr_ptr + out, s_r, mask=row_mask)
        tl.store(part_label_r_ptr + out, zr_label, mask=row_mask)
        tl.store(part_w_ptr + out, w_sum, mask=row_mask)


@triton.jit
def _linear_backward_kernel(
    h_ptr, h_stride_r, h_stride_t, h_stride_d, w_ptr, w_stride_v, w_stride_d, b_ptr,
    rh_ptr, rh_stride_r, rh_stride_t, rh_stride_d, rw_ptr, rw_stride_v, rw_stride_d, rb_ptr,
    labels_ptr, lse_ptr, ref_lse_ptr, g_ptr, g_kl_ptr, dh_ptr, dw_ptr, db_ptr,
    n_tokens, seq_len, vocab, hidden, ref_hidden, filter_eps,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_KL_GRAD: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, FILTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    r, t = rows64 // seq_len, rows64 % seq_len
    h_offsets = r * h_stride_r + t * h_stride_t
    labels = tl.load(labels_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    g = tl.load(g_ptr + rows64, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)

    x = _logits_tile(h_ptr, h_offsets, h_stride_d, row_mask, w_ptr, cols, w_stride_v, w_stride_d, col_mask,
                     hidden, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = transform(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(cols64[None, :] == labels[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if FILTER:
        largest = tl.max(tl.max(tl.where(tile_mask, tl.abs(p - onehot), 0.0), axis=1), axis=0)
    if HAS_KL_GRAD:
        g_kl = tl.load(g_kl_ptr + rows64, mask=row_mask, other=0.0)
        lse_r = tl.load(ref_lse_ptr + rows64, mask=row_mask, other=0.0)
        xr = _logits_tile(rh_ptr, r * rh_stride_r + t * rh_stride_t, rh_stride_d, row_mask, rw_ptr, cols,
                          rw_stride_v, rw_stride_d, col_mask, ref_hidden, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        if HAS_REF_BIAS:
            xr += tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        p_minus_q = p - tl.exp(zr - lse_r[:, None])
        dz += g_kl[:, None] * p_minus_q
        if FILTER:
            largest = tl.maximum(largest, tl.max(tl.max(tl.where(tile_mask, tl.abs(p_minus_q), 0.0), axis=1), axis=0))
    dx = transform_grad(x, dz, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
    dx = tl.where(tile_mask, dx, 0.0)

    keep = True
    if FILTER:
        keep = largest >= filter_eps
    if keep:
        dx_dot = dx if UPCAST_DOT else dx.to(h_ptr.dtype.element_ty)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(dx, axis=0), mask=col_mask)
        for d0 in range(0, hidden, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < hidden
            if NEED_DH:
                w = tl.load(w_ptr + cols64[:, None] * w_stride_v + ds[None, :] * w_stride_d,
                            mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    w = w.to(tl.float32)
                dh = tl.dot(dx_dot, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + rows64[:, None] * hidden + ds[None, :], dh,
                              mask=row_mask[:, None] & d_mask[None, :])
            if NEED_DW:
                h = tl.load(h_ptr + h_offsets[:, None] + ds[None, :] * h_stride_d,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dx_dot), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + cols64[:, None] * hidden + ds[None, :], dw,
                              mask=col_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------- host side


def _vocab_splits(n_tokens: int, vocab: int, cfg: TileConfig, device: torch.device) -> int:
    """Enough programs to fill the device (about 4 per SM) without splitting below one tile per program."""
    token_blocks = triton.cdiv(n_tokens, cfg.block_n)
    programs = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4)
    return max(1, min(triton.cdiv(programs, token_blocks), triton.cdiv(vocab, cfg.block_v)))


def _head_args(head: LinearHead) -> tuple:
    bias = head.bias if head.bias is not None else head.weight
    return (head.hidden, *head.hidden.stride(), head.weight, *head.weight.stride(), bias)


def _forward(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions):
    hidden, weight = policy.hidden, policy.weight
    n, vocab = labels.numel(), weight.shape[0]
    device = hidden.device
    names = ("m", "s", "label") + (("mr", "sr", "label_r", "w") if ref is not None else ())
    ref_head = ref if ref is not None else policy

    def launch(cfg: TileConfig) -> dict[str, torch.Tensor]:
        splits = _vocab_splits(n, vocab, cfg, device)
        per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.block_v) * cfg.block_v
        splits = triton.cdiv(vocab, per_split)
        parts = {k: torch.empty((splits, n), dtype=torch.float32, device=device) for k in names}
        dummy = parts["m"]
        _linear_forward_kernel[(triton.cdiv(n, cfg.block_n), splits)](
            *_head_args(policy), *_head_args(ref_head), labels,
            parts["m"], parts["s"], parts["label"],
            parts.get("mr", dummy), parts.get("sr", dummy), parts.get("label_r", dummy), parts.get("w", dummy),
            n, hidden.shape[1], vocab, hidden.shape[-1], ref_head.hidden.shape[-1], per_split,
            **transform_args(opts),
            HAS_BIAS=policy.bias is not None, HAS_REF=ref is not None, HAS_REF_BIAS=ref is not None and ref.bias is not None,
            DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=upcast_dot(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return parts

    if not n:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return {k: empty for k in ("lse", "logp", "ref_lse", "ref_logp", "kl")}
    base = tile_config(hidden.shape[-1], hidden.dtype, ref is not None, backward=False)
    cfg = _tuned(("fwd", n, vocab, hidden.shape[-1], hidden.dtype, ref is not None), base, device, launch)
    return _combine(launch(cfg), labels, opts)


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split ``(m, s)`` into ``(M, S)`` with ``lse = M + log S``."""
    big = m.max(dim=0).values
    return big, (s * torch.exp(m - big)).sum(dim=0)


def _combine(parts: dict[str, torch.Tensor], labels: torch.Tensor, opts: TokenOptions) -> dict[str, torch.Tensor]:
    mask = labels != opts.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=labels.device)
    m, s = _merge_lse(parts["m"], parts["s"])
    lse = m + torch.log(s)
    out = {"lse": lse, "logp": torch.where(mask, parts["label"].sum(0) - lse, zero)}
    if "mr" in parts:
        m_r, s_r = _merge_lse(parts["mr"], parts["sr"])
        lse_r = m_r + torch.log(s_r)
        w = (parts["w"] * torch.exp(parts["mr"] - m_r)).sum(dim=0)
        out["ref_lse"] = lse_r
        out["ref_logp"] = torch.where(mask, parts["label_r"].sum(0) - lse_r, zero)
        out["kl"] = torch.where(mask, w / s_r - lse_r + lse, zero)
    return out


def _backward(ctx, g: torch.Tensor, g_kl: torch.Tensor | None):
    hidden, weight, bias, labels, lse, ref_lse = ctx.saved_tensors
    policy, ref, opts = LinearHead(hidden, weight, bias), ctx.ref, ctx.opts
    need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    n, vocab, d = labels.numel(), weight.shape[0], hidden.shape[-1]
    device = hidden.device
    dh = torch.zeros((n, d), dtype=torch.float32, device=device) if need_dh else None
    dw = torch.zeros((vocab, d), dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if need_db else None
    use_kl = g_kl is not None
    ref_head = ref if use_kl else policy
    base = tile_config(d, hidden.dtype, use_kl, backward=True)
    filter_eps = opts.grad_filter_eps

    def launch(cfg: TileConfig, dh_buf, dw_buf, db_buf):
        _linear_backward_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v))](
            *_head_args(policy), *_head_args(ref_head), labels, lse, ref_lse if use_kl else lse,
            g, g_kl if use_kl else g,
            dh_buf if dh_buf is not None else lse, dw_buf if dw_buf is not None else lse,
            db_buf if db_buf is not None else lse,
            n, hidden.shape[1], vocab, d, ref_head.hidden.shape[-1], float(filter_eps or 0.0),
            **transform_args(opts),
            HAS_BIAS=bias is not None, HAS_KL_GRAD=use_kl, HAS_REF_BIAS=use_kl and ref.bias is not None,
            NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, FILTER=filter_eps is not None,
            DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=upcast_dot(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if n and (need_dh or need_dw or need_db):
        cfg = _tuned(("bwd", n, vocab, d, hidden.dtype, use_kl), base, device,
                     lambda c: launch(c, *(None if b is None else torch.zeros_like(b) for b in (dh, dw, db))))
        launch(cfg, dh, dw, db)
    return (
        None if dh is None else dh.view(hidden.shape).to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


_TUNED: dict[tuple, TileConfig] = {}


def _tuned(key: tuple, base: TileConfig, device: torch.device, run) -> TileConfig:
    """The heuristic configuration, or with autotuning on, the fastest candidate for this shape key (cached)."""
    if not autotune_enabled():
        return base
    if device.type != "cuda":
        raise RuntimeError("DPO_KERNELS_AUTOTUNE=1 times kernels on a CUDA device; the inputs are on " + str(device))
    if key not in _TUNED:
        timings = {cfg: triton.testing.do_bench(lambda c=cfg: run(c), warmup=5, rep=20) for cfg in tile_candidates(base)}
        _TUNED[key] = min(timings, key=timings.get)
    return _TUNED[key]


class TritonLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: TokenOptions):
        labels_flat = labels.reshape(-1).contiguous()
        out = _forward(LinearHead(hidden, weight, bias), None, labels_flat, opts)
        ctx.save_for_backward(hidden, weight, bias, labels_flat, out["lse"], None)
        ctx.opts, ctx.ref = opts, None
        return out["logp"].view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        g = upstream_grad(grad_logp, ctx.saved_tensors[3], ctx.opts.ignore_index)
        return (*_backward(ctx, g, None), None, None)


class TritonLinearTokenLogprobsAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref: LinearHead, opts: TokenOptions):
        labels_flat = labels.reshape(-1).contiguous()
        out = _forward(LinearHead(hidden, weight, bias), ref, labels_flat, opts)
        ctx.save_for_backward(hidden, weight, bias, labels_flat, out["lse"], out["ref_lse"])
        ctx.opts, ctx.ref = opts, ref
        return kl_outputs(ctx, out["logp"], out["ref_logp"], out["kl"], labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        labels = ctx.saved_tensors[3]
        g, g_kl = upstream_grads(grad_logp, grad_kl, labels, ctx.opts.ignore_index)
        return (*_backward(ctx, g, g_kl), None, None, None)
