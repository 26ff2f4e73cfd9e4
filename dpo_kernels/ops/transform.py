"""The logit post-processing of MATH.md §1 and its derivative, for the PyTorch backends.

``z = logit_scale * x``, then ``z = softcap * tanh(z / softcap)`` when a softcap is set, then ``z = z / temperature``.
"""

from __future__ import annotations

import torch

from ..options import TokenOptions


def transform_logits(x: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """Apply scale, softcap and temperature to raw logits ``x`` (any shape, float dtype); returns a new tensor."""
    if opts.is_identity_transform:
        return x
    z = x * opts.logit_scale if opts.logit_scale != 1.0 else x
    if opts.softcap is not None:
        z = torch.tanh(z / opts.softcap) * opts.softcap
    if opts.temperature != 1.0:
        z = z / opts.temperature
    return z


def transform_backward(x: torch.Tensor, grad_z: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """Chain ``grad_z = dL/dz`` back to ``dL/dx`` for raw logits ``x``; may reuse ``grad_z``'s storage."""
    if opts.is_identity_transform:
        return grad_z
    factor = opts.logit_scale / opts.temperature
    if opts.softcap is not None:
        t = torch.tanh(x * (opts.logit_scale / opts.softcap))
        # d/dx [c * tanh(s x / c)] = s * (1 - tanh^2)
        return grad_z.mul_(torch.mul(t, t).neg_().add_(1.0).mul_(factor))
    return grad_z.mul_(factor)


def slope_at(z: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``dz/dx`` from the transformed logit ``z`` itself (a new tensor): ``logit_scale / temperature``, times
    ``1 - tanh^2`` with a softcap, where ``tanh = z * temperature / softcap``."""
    factor = opts.logit_scale / opts.temperature
    if opts.softcap is None:
        return torch.full_like(z, factor)
    t = z * (opts.temperature / opts.softcap)
    return torch.mul(t, t).neg_().add_(1.0).mul_(factor)
