"""The ``cpu`` and ``cuda`` backends: the C++ / CUDA C++ kernels of ``dpo_kernels._C`` (sources in ``csrc/``).

Both backends are this one module: every op is registered per device (``csrc/cpu`` for CPU tensors,
``csrc/cuda`` for CUDA tensors) and the dispatcher picks the implementation from the inputs' device.

From logits: one fused pass over each row in the forward (online log-sum-exp, and the KL's sums with a reference),
``O(N)`` statistics saved; the backward recomputes the softmax per row and writes the gradient, into the logits'
own storage with ``inplace_backward``. From hidden states: ``csrc/linear.cpp`` tiles tokens x vocabulary, each
tile's logits an ATen GEMM folded by a fused kernel, recomputed in the backward; ``[N, V]`` is never built and the
weight gradient accumulates in fp32.
"""

from __future__ import annotations

import torch

from ..options import TokenOptions
from . import extension
from .common import LinearHead, kl_outputs, upstream_grads
from .inplace import mark_logits_overwritten, refuse_leaf_logits
from .torch_chunked import default_linear_chunks


def _ops():
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    return torch.ops.dpo_kernels


def _transform(opts: TokenOptions) -> tuple[float, float, float]:
    return float(opts.logit_scale), float(opts.softcap or 0.0), 1.0 / float(opts.temperature)


class _LogitsFunction(torch.autograd.Function):
    """Policy log-probs (and, with reference logits, reference log-probs and KL) from ``[R, T, V]`` logits."""

    @staticmethod
    def forward(ctx, logits, labels, ref_logits, opts: TokenOptions):
        if opts.inplace_backward:
            refuse_leaf_logits(logits)
        labels_flat = labels.reshape(-1).contiguous()
        logp, lse, ref_logp, ref_lse, kl = _ops().logits_forward(
            logits, labels_flat, ref_logits, opts.ignore_index, *_transform(opts)
        )
        ctx.save_for_backward(logits, labels_flat, lse, ref_logits, ref_lse if ref_logits is not None else None)
        ctx.opts = opts
        if ref_logits is None:
            return logp.view(labels.shape)
        return kl_outputs(ctx, logp, ref_logp, kl, labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *grad_rest):
        logits, labels, lse, ref_logits, ref_lse = ctx.saved_tensors
        opts = ctx.opts
        g, g_kl = upstream_grads(grad_logp, grad_rest[1] if grad_rest else None, labels, opts.ignore_index, lse.dtype)
        grad = logits if opts.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _ops().logits_backward(
            logits, labels, lse, g, ref_logits if g_kl is not None else None, ref_lse if g_kl is not None else None,
            g_kl, grad, opts.ignore_index, *_transform(opts),
        )
        if opts.inplace_backward:
            mark_logits_overwritten(logits)
        return grad, None, None, None


def _chunks(opts: TokenOptions, n: int, vocab: int) -> tuple[int, int]:
    tokens, voc = default_linear_chunks(n, vocab)
    return opts.token_chunk_size or tokens, opts.vocab_chunk_size or voc


class _LinearFunction(torch.autograd.Function):
    """Policy log-probs (and, with a reference head, reference log-probs and KL) from ``[R, T, D]`` hidden states."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref: LinearHead | None, opts: TokenOptions):
        h = hidden.reshape(-1, hidden.shape[-1])
        labels_flat = labels.reshape(-1).contiguous()
        rh = ref.hidden.reshape(-1, ref.hidden.shape[-1]) if ref is not None else None
        token_chunk, vocab_chunk = _chunks(opts, labels_flat.numel(), weight.shape[0])
        logp, lse, ref_logp, ref_lse, kl = _ops().linear_forward(
            h, weight, bias, labels_flat, rh, None if ref is None else ref.weight, None if ref is None else ref.bias,
            token_chunk, vocab_chunk, opts.ignore_index, *_transform(opts),
        )
        ctx.save_for_backward(h, weight, bias, labels_flat, lse, ref_lse if ref is not None else None)
        ctx.opts, ctx.ref, ctx.ref_hidden, ctx.hidden_shape = opts, ref, rh, hidden.shape
        if ref is None:
            return logp.view(labels.shape)
        return kl_outputs(ctx, logp, ref_logp, kl, labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *grad_rest):
        h, weight, bias, labels, lse, ref_lse = ctx.saved_tensors
        opts, ref = ctx.opts, ctx.ref
        g, g_kl = upstream_grads(grad_logp, grad_rest[1] if grad_rest else None, labels, opts.ignore_index, lse.dtype)
        use_kl = g_kl is not None
        token_chunk, vocab_chunk = _chunks(opts, labels.numel(), weight.shape[0])
        need = ctx.needs_input_grad
        dh, dw, db = _ops().linear_backward(
            h, weight, bias, labels, lse, g,
            ctx.ref_hidden if use_kl else None, ref.weight if use_kl else None, ref.bias if use_kl else None,
            ref_lse if use_kl else None, g_kl, need[0], need[1], need[2] and bias is not None,
            token_chunk, vocab_chunk, -1.0 if opts.grad_filter_eps is None else float(opts.grad_filter_eps),
            *_transform(opts),
        )
        return (
            dh.view(ctx.hidden_shape) if need[0] else None,
            dw if need[1] else None,
            db if need[2] and bias is not None else None,
            None, None, None,
        )


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    return _LogitsFunction.apply(logits, labels, None, opts)


def token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions):
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
    return _LogitsFunction.apply(logits, labels, ref_logits.detach(), opts)


def linear_token_logprobs(hidden, weight, bias, labels, opts: TokenOptions):
    """``hidden [R, T, D]``, ``weight [V, D]``, ``bias [V]`` or ``None`` -> ``logp [R, T]``."""
    return _LinearFunction.apply(hidden, weight, bias, labels, None, opts)


def linear_token_logprobs_and_kl(hidden, weight, bias, ref: LinearHead, labels, opts: TokenOptions):
    """Policy head plus reference head -> ``(logp, ref_logp, kl)``; the reference receives no gradient."""
    ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    return _LinearFunction.apply(hidden, weight, bias, labels, ref, opts)
