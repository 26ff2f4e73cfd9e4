"""A gradient through the per-token entropy the linear path logs (TRL's ``entropy`` output, which some trainers put
in their loss): one more pass over the vocabulary in the backward, in PyTorch ops over the same tiles.

With ``H = lse - sum_v p_v z_v`` and ``μ = sum_v p_v z_v = lse - H``, ``dH/dz_v = -p_v (z_v - μ)``, times the logit
transform's slope ``t'(x_v)`` (MATH.md §1). The forward already holds ``H``; ``lse`` follows from the log-prob and
the label's logit (``lse = z_y - logp``: one gathered row of the head per token). The backward recomputes each tile
``x = h W_c^T (+ b_c)`` (the products as the forward's, :mod:`.products`), forms ``dZ = -g p (z - μ) t'(x)`` in the
statistics dtype and accumulates ``dH``, ``dW`` (fp32, ``dZ`` as GEMM operands) and ``db``: ``2 n D V`` FLOPs to
recompute and ``4 n D V`` for the two gradients, only when the entropy receives a gradient (logging it costs
nothing).
"""

from __future__ import annotations

import torch

from ...options import TokenOptions
from ..common import LinearHead, first_order_only
from ..transform import transform_logits
from .kept import KeptTokens
from .loop import head_products, no_autocast
from .plan import plan_tiles


def differentiable_entropy(entropy: torch.Tensor, logp: torch.Tensor, head: LinearHead, labels: torch.Tensor,
                           opts: TokenOptions) -> torch.Tensor:
    """``entropy [..., T]`` (computed, without gradient) made differentiable with respect to ``head``'s hidden
    states, weight and bias; ``logp [..., T]`` the log-probs of the same call, ``labels`` its labels."""
    return _EntropyGrad.apply(entropy.detach(), logp.detach(), head.hidden, head.weight, head.bias, labels, opts)


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
        need_h, need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        rows = KeptTokens(labels, opts.ignore_index)
        sdt = products.out_dtype
        with no_autocast(hidden.device):
            h = products.operand(rows.gather(hidden))
            g = rows.select(grad, sdt)
            label_rows = products.operand(weight[rows.labels.clamp(0, weight.shape[0] - 1)])
            x_y = (h.to(sdt) * label_rows.to(sdt)).sum(-1)
            if bias is not None:
                x_y = x_y + products.bias(bias)[rows.labels.clamp(0, weight.shape[0] - 1)]
            lse = transform_logits(x_y, opts) - rows.select(logp, sdt)
            mu = lse - rows.select(entropy, sdt)
            n, vocab = rows.n, weight.shape[0]
            dh = torch.zeros((n, weight.shape[1]), dtype=sdt, device=hidden.device) if need_h else None
            dw = torch.zeros(weight.shape, dtype=sdt, device=hidden.device) if need_w else None
            db = torch.zeros(vocab, dtype=sdt, device=hidden.device) if need_b else None
            plan = plan_tiles(n, vocab, 3 * sdt.itemsize, opts, hidden.device, dim=weight.shape[1])
            b = products.bias(bias)
            for n0, n1 in plan.token_blocks(n):
                for v0, v1 in plan.vocab_chunks(vocab):
                    w_c = products.operand(weight[v0:v1])
                    x = products.logits(h[n0:n1], w_c, torch.empty((n1 - n0, v1 - v0), dtype=sdt,
                                                                   device=hidden.device))
                    if b is not None:
                        x += b[v0:v1]
                    x.requires_grad_()
                    with torch.enable_grad():  # dz/dx through the transform, by autograd over this tile alone
                        z = transform_logits(x, opts)
                    p = torch.exp(z.detach() - lse[n0:n1, None])
                    dz_dz = p.mul_(mu[n0:n1, None] - z.detach()).mul_(g[n0:n1, None])
                    (dz,) = torch.autograd.grad(z, x, dz_dz) if z is not x else (dz_dz,)
                    if db is not None:
                        db[v0:v1] += dz.sum(0)
                    dz = dz.to(products.operand_dtype)  # the GEMM operands, as the loop's dZ
                    if dh is not None:
                        products.accumulate(dh[n0:n1], dz, w_c)
                    if dw is not None:
                        products.accumulate(dw[v0:v1], dz.T, h[n0:n1])
        return (None, None, None if dh is None else rows.scatter(dh, hidden.shape, hidden.dtype),
                None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype), None, None)
