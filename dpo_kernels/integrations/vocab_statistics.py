"""Per-token statistics over the vocabulary that trainers log (no gradient), computed tile by tile from hidden states.

``entropy = lse - sum_v p_v z_v``, ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits = mean_v z_v`` and
``is_top1 = (label is the first argmax of z)``, with ``z`` the post-processed logits (FORMULAS.md §1). These are the
definitions TRL 1.16 logs. One extra pass of tile products; ``[N, V]`` is never built.
"""

from __future__ import annotations

import torch

from ..ops.transform import transform_logits
from ..options import TokenOptions

_TOKENS, _VOCAB = 1024, 4096


@torch.no_grad()
def vocab_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    opts: TokenOptions, wanted: set[str],
) -> dict[str, torch.Tensor]:
    """``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` (valid ids) -> the ``wanted`` statistics, each ``[N]``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    m = torch.full((n,), float("-inf"), device=dev)
    s, x_sum, sq_sum, z_sum, label_z = (torch.zeros(n, device=dev) for _ in range(5))
    max_before = torch.full((n,), float("-inf"), device=dev)
    for n0 in range(0, n, _TOKENS):
        n1 = min(n, n0 + _TOKENS)
        h, y = hidden[n0:n1], targets[n0:n1]
        for v0 in range(0, vocab, _VOCAB):
            v1 = min(vocab, v0 + _VOCAB)
            tile = h @ weight[v0:v1].T
            if bias is not None:
                tile = tile + bias[v0:v1]
            z = transform_logits(tile.float(), opts)
            local = y - v0
            z_sum[n0:n1] += z.sum(-1)
            before = torch.arange(v1 - v0, device=dev) < local.unsqueeze(-1)
            max_before[n0:n1] = torch.maximum(max_before[n0:n1], z.masked_fill(~before, float("-inf")).amax(-1))
            m_new = torch.maximum(m[n0:n1], z.amax(-1))
            rescale = torch.exp(m[n0:n1] - m_new)
            e = torch.exp(z - m_new.unsqueeze(-1))
            s[n0:n1] = s[n0:n1] * rescale + e.sum(-1)
            x_sum[n0:n1] = x_sum[n0:n1] * rescale + (e * z).sum(-1)
            sq_sum[n0:n1] = sq_sum[n0:n1] * rescale * rescale + (e * e).sum(-1)
            m[n0:n1] = m_new
            hit = (local >= 0) & (local < v1 - v0)
            label_z[n0:n1] = torch.where(hit, z.gather(-1, local.clamp(0, v1 - v0 - 1).unsqueeze(-1)).squeeze(-1),
                                         label_z[n0:n1])
    lse = m + torch.log(s)
    stats = {
        "entropy": lse - x_sum / s,
        "log_sum_sq_probs": torch.log(sq_sum) - 2 * torch.log(s),
        "mean_logits": z_sum / vocab,
        "is_top1": (label_z >= m) & (label_z > max_before),
    }
    return {k: v for k, v in stats.items() if k in wanted}
