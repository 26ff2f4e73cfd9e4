"""Intermediate-layer DPO (MATH.md §4): ``L = (1 - λ) L^(final) + λ mean_{k in K} L^(k)``.

Each layer's loss is :func:`dpo_kernels.fused_dpo_loss` on that layer's hidden states through the shared output head
(get them, normed or not, from :func:`dpo_kernels.integrations.transformers.causal_lm_hidden_states`). Only the fused
path keeps this affordable: ``|K| + 1`` heads over ``V`` would otherwise build ``|K| + 1`` logits tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .dpo import DPOLossConfig, DPOLossOutput, PreferenceInputs, compute_dpo_loss


def intermediate_dpo_loss(
    *,
    labels: torch.Tensor,
    policy_hidden: torch.Tensor,
    policy_layer_hidden: Mapping[int, torch.Tensor],
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_layer_hidden: Mapping[int, torch.Tensor] | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    ref_lm_head_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    intermediate_weight: float = 0.5,
    **options,
) -> DPOLossOutput:
    """The combined loss; ``options`` are :func:`fused_dpo_loss`'s (``loss_type``, ``beta``, ``shift``, ...).

    ``policy_hidden`` is the final layer's ``[2B, T, D]``; ``policy_layer_hidden`` maps layer indices to theirs. The
    reference is read at the same layers when ``ref_layer_hidden`` is given (same keys), else at its final layer
    (``ref_hidden``, or precomputed ``ref_logps``) for every layer. Returns the final layer's output with ``loss``
    replaced by the combination and ``metrics`` extended by ``loss/final``, ``loss/intermediate`` and
    ``loss/layer_<k>`` (the unweighted per-layer losses).
    """
    if not policy_layer_hidden:
        raise ValueError("policy_layer_hidden must name at least one intermediate layer")
    if isinstance(intermediate_weight, bool) or not 0.0 <= float(intermediate_weight) <= 1.0:
        raise ValueError(f"intermediate_weight must be in [0, 1], got {intermediate_weight!r}")
    if ref_layer_hidden is not None and set(ref_layer_hidden) != set(policy_layer_hidden):
        raise ValueError(
            f"ref_layer_hidden must have the layers of policy_layer_hidden {sorted(policy_layer_hidden)}, "
            f"got {sorted(ref_layer_hidden)}"
        )
    if ref_layer_hidden is not None and ref_lm_head_weight is None:
        raise ValueError("ref_layer_hidden needs ref_lm_head_weight [V, D_ref]")
    config = DPOLossConfig(**options)

    def layer_loss(hidden: torch.Tensor, reference: torch.Tensor | None) -> DPOLossOutput:
        return compute_dpo_loss(config, PreferenceInputs(
            labels=labels, policy_hidden=hidden, lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias,
            ref_hidden=reference, ref_lm_head_weight=ref_lm_head_weight if reference is not None else None,
            ref_lm_head_bias=ref_lm_head_bias if reference is not None else None,
            ref_logps=ref_logps if reference is None else None,
        ))

    final = layer_loss(policy_hidden, ref_hidden)
    per_layer = {
        k: layer_loss(h, ref_layer_hidden[k] if ref_layer_hidden is not None else ref_hidden).loss
        for k, h in sorted(policy_layer_hidden.items())
    }
    intermediate = torch.stack(list(per_layer.values())).mean()
    lam = float(intermediate_weight)
    # tensors: read with the other metrics, when they are first looked at (dpo_kernels.metrics)
    layer_metrics = {"loss/final": final.loss.detach(), "loss/intermediate": intermediate.detach()}
    layer_metrics.update({f"loss/layer_{k}": v.detach() for k, v in per_layer.items()})
    final.add_metrics(layer_metrics)
    final.loss = (1.0 - lam) * final.loss + lam * intermediate
    return final
