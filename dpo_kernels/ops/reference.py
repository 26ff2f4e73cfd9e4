"""The ``reference`` backend: the naive PyTorch oracle every other backend is tested against.

It materialises everything (full ``[N, V]`` logits, their fp32 log-softmax and, through autograd, their gradients),
so it is for tests and tiny inputs only; ``backend="auto"`` never picks it. Gradients come from autograd, which
makes it independent of the hand-written backward passes of the other backends.

Every function takes ``[R, T, ...]`` inputs (leading dimensions collapsed by the caller) and returns ``[R, T]``
statistics in fp32 (fp64 for fp64 inputs), 0 at positions whose label is ``opts.ignore_index``.
"""

from __future__ import annotations

import torch

from ..options import TokenOptions, statistics_dtype
from .common import LinearHead, kl_terms, nan_out_of_vocab, split_labels
from .inplace import mark_logits_overwritten, refuse_leaf_logits
from .linear.contract import LOGGED_OUTPUTS
from .linear.products import product_dtype
from .transform import transform_logits


def _policy_logits(logits: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits``; with ``inplace_backward``, a view of them whose gradient is copied into the logits' own storage
    (a hook on the view, which the oracle alone uses: autograd still computes the gradient as it would)."""
    if not opts.inplace_backward:
        return logits
    refuse_leaf_logits(logits)
    view = logits.view_as(logits)

    def into_storage(grad: torch.Tensor) -> torch.Tensor:
        logits.copy_(grad)
        mark_logits_overwritten(logits)
        return logits

    view.register_hook(into_storage)
    return view


def _require_exact_gradients(opts: TokenOptions) -> None:
    if opts.grad_filter_eps is not None:
        raise ValueError(
            "backend='reference' is the exact oracle; grad_filter_eps applies to the tile-kernel backends "
            "(torch, cpu, cuda, triton)"
        )


def _log_softmax(logits: torch.Tensor, opts: TokenOptions, dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 log-softmax (fp64 for fp64 logits, or in ``dtype``, the statistics dtype of a policy/reference pair)."""
    z = transform_logits(logits.to(dtype or statistics_dtype(logits.dtype)), opts)
    return torch.log_softmax(z, dim=-1)


def _gather_masked(logprobs: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    vocab = logprobs.shape[-1]
    index, mask = split_labels(labels, opts.ignore_index, vocab)
    picked = nan_out_of_vocab(logprobs.gather(-1, index.unsqueeze(-1)).squeeze(-1), labels, vocab, opts.ignore_index)
    return torch.where(mask, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def _forward_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor, opts: TokenOptions):
    """``sum_v q_v (log q_v - log p_v)`` with ``q = exp(ref_logprobs)``; an underflowed ``q_v = 0`` adds 0."""
    kl = kl_terms(ref_logprobs, logprobs).sum(-1)
    mask = labels != opts.ignore_index
    return torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def _only_kept(x: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``x [R, T, K]`` with 0 at masked positions: whatever they hold (padding may give NaN) reaches no sum and no
    gradient (autograd's 0 * NaN would be NaN)."""
    keep = (labels != opts.ignore_index).unsqueeze(-1)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    logits = _only_kept(_policy_logits(logits, opts), labels, opts)
    return _gather_masked(_log_softmax(logits, opts), labels, opts)


def token_logprobs_and_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; the reference side is detached."""
    sdt = statistics_dtype(logits.dtype, ref_logits.dtype)
    logprobs = _log_softmax(_only_kept(_policy_logits(logits, opts), labels, opts), opts, sdt)
    ref_logprobs = _log_softmax(_only_kept(ref_logits.detach(), labels, opts), opts, sdt)
    return (
        _gather_masked(logprobs, labels, opts),
        _gather_masked(ref_logprobs, labels, opts),
        _forward_kl(ref_logprobs, logprobs, labels, opts),
    )


def _head_logits(head: LinearHead) -> torch.Tensor:
    """``nn.Linear``'s logits, in the dtype of :func:`product_dtype` (the autocast dtype under autocast, else the
    promoted inputs' dtype): the product rounded to that dtype, as a naive head would give it."""
    dtype = product_dtype(head.hidden, head.weight)
    bias = None if head.bias is None else head.bias.to(dtype)
    return torch.nn.functional.linear(head.hidden.to(dtype), head.weight.to(dtype), bias)


def linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions,
                       logging: bool = False, head_context=None, kept_count: int | None = None):
    """Policy head ``hidden [R, T, D]``, ``weight [V, D]`` (and a reference head) -> ``logp [R, T]`` (or
    ``(logp, ref_logp, kl)``); builds the full logits of each head, as ``nn.Linear`` would (under autocast, in the
    autocast dtype). With ``logging``, also the statistics trainers log, from the full logits (see
    :func:`dpo_kernels.ops.linear.contract.logging_outputs`). ``head_context`` is not needed: the backward is
    autograd's, which reads the head's product as ``nn.Linear``'s own backward would; nor is ``kept_count``: the
    oracle drops no token."""
    _require_exact_gradients(opts)
    policy = LinearHead(_only_kept(policy.hidden, labels, opts), policy.weight, policy.bias)
    logits = _head_logits(policy)
    if ref is None:
        out = token_logprobs(logits, labels, opts)
    else:
        ref_hidden = _only_kept(ref.hidden.detach(), labels, opts)
        ref_logits = _head_logits(LinearHead(ref_hidden, ref.weight.detach(), _detach(ref.bias)))
        out = token_logprobs_and_kl(logits, ref_logits, labels, opts)
    return (out, _logged(logits.detach(), labels, opts)) if logging else out


@torch.no_grad()
def _logged(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> dict[str, torch.Tensor]:
    """Entropy, log sum p^2, mean logit and "the label is the first argmax", 0 (False) at ignored tokens."""
    z = transform_logits(logits.to(statistics_dtype(logits.dtype)), opts)
    logprobs = torch.log_softmax(z, dim=-1)
    index, mask = split_labels(labels, opts.ignore_index)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    values = (entropy, torch.logsumexp(2 * logprobs, dim=-1), z.mean(-1), z.argmax(-1) == index)
    zero = torch.zeros((), device=z.device)
    return {k: torch.where(mask, v, zero.to(v.dtype)) for k, v in zip(LOGGED_OUTPUTS, values, strict=True)}


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
