"""A gradient through the per-token entropy the linear path logs (TRL's ``entropy`` output, which some trainers put
in their loss): one more pass over the vocabulary in the backward, through the one tile loop (:func:`.loop.grad_all`)
with a source whose ``grad`` forms the entropy's ``dZ`` in PyTorch ops.

With ``H = lse - sum_v p_v z_v`` and ``μ = sum_v p_v z_v = lse - H``, ``dH/dz_v = -p_v (z_v - μ)``, times the logit
transform's slope ``t'(x_v)`` (MATH.md §1). The forward already holds ``H``; ``lse`` follows from the log-prob and
the label's logit (``lse = z_y - logp``: one gathered row of the head per token). The backward recomputes each tile
``x = h W_c^T (+ b_c)`` (the products as the forward's, :mod:`.products`), forms ``dZ = -g p (z - μ) t'(x)`` and the
loop accumulates ``dH``, ``dW`` and ``db`` as for the log-probs: ``2 n D V`` FLOPs to recompute and ``4 n D V`` for
the two gradients, only when the entropy receives a gradient (logging it costs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...options import TokenOptions
from ..common import LinearHead, first_order_only
from ..transform import slope_at, transform_logits
from .contract import TileKernels
from .kept import KeptTokens
from .loop import Backward, grad_all, head_products, no_autocast
from .sources import GemmSource


def differentiable_entropy(entropy: torch.Tensor, logp: torch.Tensor, head: LinearHead, labels: torch.Tensor,
                           opts: TokenOptions) -> torch.Tensor:
    """``entropy [..., T]`` (computed, without gradient) made differentiable with respect to ``head``'s hidden
    states, weight and bias; ``logp [..., T]`` the log-probs of the same call, ``labels`` its labels."""
    return _EntropyGrad.apply(entropy.detach(), logp.detach(), head.hidden, head.weight, head.bias, labels, opts)


@dataclass
class _EntropySource(GemmSource):
    """The head's tiles, recomputed, with ``μ [n]`` (each token's ``sum_v p_v z_v``): its :meth:`grad` is the
    entropy's ``dZ`` of a tile (``g`` the entropy's upstream; no reference, no filter)."""

    mu: torch.Tensor | None = None

    def grad(self, kernels: TileKernels, block: tuple[int, int, int, int], labels: torch.Tensor, lse, g, ref_tile,
             ref_lse, g_kl, opts: TokenOptions, out: torch.Tensor | None) -> torch.Tensor:
        n0, n1, v0, v1 = block
        tile = self.tile(n0, n1, v0, v1, labels)
        z = transform_logits(tile.logits if tile.bias is None else tile.logits + tile.bias, opts)
        dz = torch.exp(z - lse.unsqueeze(1)).mul_(self.mu[n0:n1].unsqueeze(1) - z).mul_(g.unsqueeze(1))
        if not opts.is_identity_transform:
            dz.mul_(slope_at(z, opts))
        out = tile.logits if out is None else out
        return out.copy_(dz)


class _EntropyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entropy, logp, hidden, weight, bias, labels, opts):
        products, _ = head_products(hidden, weight, None)
        ctx.save_for_backward(entropy, logp, hidden, weight, bias, labels)
        ctx.opts, ctx.products = opts, products
        return entropy.clone()

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        entropy, logp, hidden, weight, bias, labels = ctx.saved_tensors
        opts, products = ctx.opts, ctx.products
        need = (ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4] and bias is not None)
        rows = KeptTokens(labels, opts.ignore_index)
        sdt = products.out_dtype
        with no_autocast(hidden.device):
            source = _EntropySource.of(LinearHead(hidden, weight, bias), rows, products)
            columns = rows.labels.clamp(0, weight.shape[0] - 1)
            x_y = (source.h.to(sdt) * products.operand(weight[columns]).to(sdt)).sum(-1)
            if source.bias is not None:
                x_y = x_y + source.bias[columns]
            lse = transform_logits(x_y, opts) - rows.select(logp, sdt)
            source.mu = lse - rows.select(entropy, sdt)
            bw = Backward(lse, None, rows.select(grad, sdt), None, opts, kernels=None)
            dh, dw, db = grad_all(rows, source, None, bw, need)
        return (None, None, None if dh is None else rows.scatter(dh, hidden.shape, hidden.dtype), dw,
                None if db is None else db.to(bias.dtype), None, None)
