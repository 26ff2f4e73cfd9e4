"""``inplace_backward=True`` for the from-logits primitives: the gradient is written into the logits' own storage.

This saves the one ``[N, V]`` allocation of the backward when the caller no longer needs the logits (the usual case:
they come out of the LM head, whose backward needs only the hidden states and the weight). Two guards keep it safe:

- refused up front for a leaf tensor that requires grad: its ``.grad`` would alias its own data;
- after the write, the logits' version counter is bumped, so any other autograd node that saved the same logits
  raises PyTorch's standard "modified by an inplace operation" error instead of silently reading a gradient.
"""

from __future__ import annotations

import torch


def refuse_leaf_logits(logits: torch.Tensor) -> None:
    """Called in ``forward``: refuse logits whose storage the caller still owns as a differentiable leaf (directly,
    or through a view such as the reshape the primitives apply)."""
    owner = logits if logits._base is None else logits._base
    if owner.is_leaf and owner.requires_grad:
        raise ValueError(
            "inplace_backward=True would write the gradient into logits, but logits is a leaf tensor that requires "
            "grad (its .grad would alias its own values); pass the output of the LM head, or inplace_backward=False"
        )


def mark_logits_overwritten(logits: torch.Tensor) -> None:
    """Called in ``backward`` after the gradient overwrote ``logits``: invalidate every other saved use of it."""
    torch.autograd.graph.increment_version(logits)
