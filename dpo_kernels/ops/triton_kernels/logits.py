"""Triton kernels from logits: the row kernels of :mod:`dpo_kernels.ops.logits_path` (``logits_forward``, and its
``RAW`` variant ``logits_fold`` for a vocabulary slice, ``logits_backward``).

Forward: one program per token reads its logits row once in ``BLOCK_V`` steps, keeping the online log-sum-exp
(running max ``m`` and rescaled sum ``s``) and, with a reference row, the reference's ``m_r``, ``s_r`` and the
weighted sum ``w = sum_v e^{zr_v - m_r} (zr_v - z_v)`` (MATH.md §1). The maxima are scalars, one cross-warp
reduction per step (two with a reference); the sums are kept per lane and reduced once after the row, where they
were reduced at every step (two reductions per step, five with a reference). It writes ``O(N)`` statistics only. A
masked token skips its row entirely.

Backward: one program per token recomputes the softmax from the saved ``lse`` and writes
``g (onehot - p) + g_kl (p - q)`` times the transform's slope (one tanh per logit with a softcap); a masked token
writes its zeros without reading its row. With ``inplace_backward`` it writes into the logits' own storage, so the
step allocates no ``[N, V]`` gradient at all.

Design goal (GPU benchmarks, not tests): at least 85% of the device's memory bandwidth (2.85 TB/s on an H100), i.e.
each logits element read once in the forward and read once plus written once in the backward. Not yet measured with
these changes; the earlier kernels measured 2.2 TB/s on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...options import TokenOptions
from .config import row_config
from .jit_helpers import LOWEST, finish_lse, fold_reference_block, transform, transform_and_slope
from .launch import on_device, transform_args


# Absent buffers are passed as None and their constexpr flags derived from that, as in tiles.py. RAW (stats_ptr
# given): the ``fold`` kernel, writing the row's named statistics (StatRow / RefRow rows, row strides given) instead
# of finishing them.
@triton.heuristics({"HAS_REF": lambda a: a["ref_ptr"] is not None, "RAW": lambda a: a["stats_ptr"] is not None})
@triton.jit
def _logits_forward_kernel(
    x_ptr, x_stride_r, x_stride_t, x_stride_v,
    ref_ptr, ref_stride_r, ref_stride_t, ref_stride_v,
    labels_ptr, logp_ptr, lse_ptr, ref_logp_ptr, ref_lse_ptr, kl_ptr,
    stats_ptr, stats_stride, ref_stats_ptr, ref_stats_stride,
    seq_len, vocab, ignore_index,
    logit_scale, softcap, inv_temperature,
    HAS_REF: tl.constexpr, RAW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r, t = row // seq_len, row % seq_len
    x_row = x_ptr + r * x_stride_r + t * x_stride_t
    if HAS_REF:
        ref_row = ref_ptr + r * ref_stride_r + t * ref_stride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_vocab = (label >= 0) & (label < vocab)  # else (check_labels=False): NaN, and nothing read out of bounds
    safe_label = tl.where(valid & in_vocab, label, 0)
    end = tl.where(valid, vocab, 0)  # a masked token reads nothing

    # the running maxima are scalars (one cross-warp reduction per block); the sums are kept per lane and reduced once
    m = LOWEST
    s_lanes = tl.zeros((BLOCK_V,), dtype=tl.float32)
    m_r = LOWEST
    s_r_lanes = tl.zeros((BLOCK_V,), dtype=tl.float32)
    w_lanes = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < vocab
        x = tl.load(x_row + cols * x_stride_v, mask=inside, other=0.0).to(tl.float32)
        z = transform(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        z_masked = tl.where(inside, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z_masked, axis=0))
        s_lanes = s_lanes * tl.exp(m - m_new) + tl.exp(z_masked - m_new)
        m = m_new
        if HAS_REF:
            xr = tl.load(ref_row + cols * ref_stride_v, mask=inside, other=0.0).to(tl.float32)
            zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
            m_r, s_r_lanes, w_lanes = fold_reference_block(z, zr, inside, m_r, s_r_lanes, w_lanes)
    s = tl.sum(s_lanes, axis=0)
    x_label = tl.load(x_row + safe_label * x_stride_v).to(tl.float32)
    z_label = transform(x_label, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
    if RAW:  # the named statistics, stored as soon as they are formed (a label held elsewhere adds no label logit)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + stats_stride + row, s)
        tl.store(stats_ptr + 2 * stats_stride + row, tl.where(valid & in_vocab, z_label, 0.0))
    # a masked token read nothing: give it neutral statistics so log(0) and 0/0 are never formed
    lse = finish_lse(tl.where(valid, m, 0.0), tl.where(valid, s, 1.0))
    if not RAW:
        tl.store(logp_ptr + row, tl.where(valid, tl.where(in_vocab, z_label - lse, float("nan")), 0.0))
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if HAS_REF:
        s_r = tl.sum(s_r_lanes, axis=0)
        w = tl.sum(w_lanes, axis=0)
        xr_label = tl.load(ref_row + safe_label * ref_stride_v).to(tl.float32)
        zr_label = transform(xr_label, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
        if RAW:
            tl.store(ref_stats_ptr + row, m_r)
            tl.store(ref_stats_ptr + ref_stats_stride + row, s_r)
            tl.store(ref_stats_ptr + 2 * ref_stats_stride + row, tl.where(valid & in_vocab, zr_label, 0.0))
            tl.store(ref_stats_ptr + 3 * ref_stats_stride + row, w)
        else:
            lse_r = finish_lse(tl.where(valid, m_r, 0.0), tl.where(valid, s_r, 1.0))
            tl.store(ref_logp_ptr + row, tl.where(valid, tl.where(in_vocab, zr_label - lse_r, float("nan")), 0.0))
            tl.store(ref_lse_ptr + row, tl.where(valid, lse_r, 0.0))
            tl.store(kl_ptr + row, tl.where(valid, w / s_r - lse_r + lse, 0.0))


@triton.heuristics({"HAS_KL_GRAD": lambda a: a["g_kl_ptr"] is not None})
@triton.jit
def _logits_backward_kernel(
    x_ptr, x_stride_r, x_stride_t, x_stride_v,
    ref_ptr, ref_stride_r, ref_stride_t, ref_stride_v,
    grad_ptr, grad_stride_r, grad_stride_t, grad_stride_v,
    labels_ptr, lse_ptr, ref_lse_ptr, g_ptr, g_kl_ptr,
    seq_len, vocab, ignore_index,
    logit_scale, softcap, inv_temperature,
    HAS_KL_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r, t = row // seq_len, row % seq_len
    x_row = x_ptr + r * x_stride_r + t * x_stride_t
    if HAS_KL_GRAD:
        ref_row = ref_ptr + r * ref_stride_r + t * ref_stride_t
    grad_row = grad_ptr + r * grad_stride_r + t * grad_stride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    if HAS_KL_GRAD:
        g_kl = tl.load(g_kl_ptr + row)
        lse_r = tl.load(ref_lse_ptr + row)
    if valid:
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vocab
            x = tl.load(x_row + cols * x_stride_v, mask=inside, other=0.0).to(tl.float32)
            z, slope = transform_and_slope(x, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP,
                                           HAS_TEMPERATURE)
            p = tl.exp(z - lse)
            dz = tl.where(cols == label, g, 0.0) - g * p
            if HAS_KL_GRAD:
                xr = tl.load(ref_row + cols * ref_stride_v, mask=inside, other=0.0).to(tl.float32)
                zr = transform(xr, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP, HAS_TEMPERATURE)
                dz += g_kl * (p - tl.exp(zr - lse_r))
            tl.store(grad_row + cols * grad_stride_v, (dz * slope).to(grad_ptr.dtype.element_ty), mask=inside)
    else:  # a masked row: zeros, without reading its logits
        zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row + cols * grad_stride_v, zeros, mask=cols < vocab)


def logits_forward(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions):
    """The from-logits ``forward`` kernel (:mod:`dpo_kernels.ops.logits_path`): one program per token."""
    n = labels.numel()
    out = {k: torch.empty(n, dtype=torch.float32, device=logits.device) for k in ("logp", "lse")}
    if ref_logits is not None:
        out.update({k: torch.empty(n, dtype=torch.float32, device=logits.device) for k in ("ref_logp", "ref_lse", "kl")})
    _launch_forward(logits, ref_logits, labels, opts, (out["logp"], out["lse"], out.get("ref_logp"),
                                                       out.get("ref_lse"), out.get("kl")), (None, 0, None, 0))
    return out["logp"], out["lse"], out.get("ref_logp"), out.get("ref_lse"), out.get("kl")


def logits_fold(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions,
                stats: torch.Tensor, ref_stats: torch.Tensor | None) -> None:
    """The from-logits ``fold`` kernel: the forward's program per token, writing the named statistics."""
    raw = (stats, stats.stride(0), ref_stats, 0 if ref_stats is None else ref_stats.stride(0))
    _launch_forward(logits, ref_logits, labels, opts, (None,) * 5, raw)


def _launch_forward(logits, ref_logits, labels, opts: TokenOptions, finished: tuple, raw: tuple) -> None:
    n = labels.numel()
    cfg = row_config(logits.shape[-1], ref_logits is not None)
    ref_strides = (0, 0, 0) if ref_logits is None else ref_logits.stride()
    if n:
        with on_device(logits):
            _logits_forward_kernel[(n,)](
                logits, *logits.stride(), ref_logits, *ref_strides, labels, *finished, *raw,
                logits.shape[1], logits.shape[2], opts.ignore_index,
                **transform_args(opts), BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
            )


def logits_backward(logits, ref_logits, labels, lse, ref_lse, g, g_kl, opts: TokenOptions, grad) -> None:
    """The from-logits ``backward`` kernel: one program per token writes its row of ``grad``."""
    cfg = row_config(logits.shape[-1], g_kl is not None)
    ref = ref_logits if g_kl is not None else None
    ref_strides = (0, 0, 0) if ref is None else ref.stride()
    if labels.numel():
        with on_device(logits):
            _logits_backward_kernel[(labels.numel(),)](
                logits, *logits.stride(), ref, *ref_strides, grad, *grad.stride(),
                labels, lse, None if ref is None else ref_lse, g, g_kl,
                logits.shape[1], logits.shape[2], opts.ignore_index,
                **transform_args(opts), BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
            )
