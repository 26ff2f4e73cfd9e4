"""Small pieces every backend uses: the reference head bundle and label masking."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class LinearHead:
    """Hidden states and the output head that turns them into logits: ``z = hidden @ weight.T (+ bias)``.

    The policy's head and the reference's alike, on every path from hidden states. A reference head is passed to the
    autograd functions as a plain object, not as tensors, because the reference receives no gradient (MATH.md §1).

    Shapes: ``hidden [R, T, D]``, ``weight [V, D]``, ``bias [V]`` or ``None``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def split_labels(labels: torch.Tensor, ignore_index: int, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(index, mask)``: labels usable for gathering (ignored positions point at 0; with ``vocab``, every
    index clamped into ``[0, vocab)``, so that a label let through by ``check_labels=False`` reads nothing out of
    bounds: :func:`nan_out_of_vocab` then marks its result) and the bool mask."""
    mask = labels != ignore_index
    index = torch.where(mask, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)).long()
    return (index, mask) if vocab is None else (index.clamp(0, vocab - 1), mask)


def nan_out_of_vocab(values: torch.Tensor, labels: torch.Tensor, vocab: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """``values`` with NaN wherever ``labels`` (same shape) is neither ``ignore_index`` (when given) nor in
    ``[0, vocab)``: an out-of-range label (only possible with ``check_labels=False``) gives NaN on every backend,
    never a crash or a plausible number. One elementwise pass over ``[N]``, no host sync."""
    bad = (labels < 0) | (labels >= vocab)
    if ignore_index is not None:
        bad &= labels != ignore_index
    return values.masked_fill(bad, float("nan"))


def kl_terms(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``q (log q - log p)`` elementwise; an underflowed ``q = 0`` contributes exactly 0 (xlogy semantics), a NaN
    ``q`` (a non-finite reference row) stays NaN."""
    q = ref_logprobs.exp()
    return torch.where(q == 0, torch.zeros((), dtype=q.dtype, device=q.device), q * (ref_logprobs - logprobs))


def first_order_only(backward):
    """Decorates the ``backward`` of a fused kernel's autograd function: the hand-written backwards are not
    themselves differentiable, so a double backward (``create_graph=True``: gradient penalties, Hessian-vector
    products) is refused with this message instead of PyTorch's generic one, or a gradient silently detached from
    the graph. ``backend="reference"`` (autograd through full logits) supports it."""
    plain = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(
                "dpo_kernels: the fused kernels have no double backward (create_graph=True); compute the gradient "
                "without create_graph, or use backend='reference' (full logits, for small inputs) for higher-order "
                "gradients")
        return plain(ctx, *grads)

    return wrapper
