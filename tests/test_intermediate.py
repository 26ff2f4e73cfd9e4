"""Intermediate-layer DPO against its full-logits computation (MATH.md §4)."""

from __future__ import annotations

import pytest
import torch

from dpo_kernels import fused_dpo_loss
from dpo_kernels.intermediate import intermediate_dpo_loss

B, T, V, D = 2, 6, 53, 8


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    hs = {k: torch.randn(2 * B, T, D, generator=g, dtype=torch.float64) for k in (2, 4, "final")}
    ref = {k: torch.randn(2 * B, T, D, generator=g, dtype=torch.float64) for k in (2, 4, "final")}
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    w_ref = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    return labels, hs, ref, w, w_ref


def _full_logits_loss(labels, h, r, w, w_ref, **opts):
    return fused_dpo_loss(labels=labels, policy_logits=h @ w.T, ref_logits=r @ w_ref.T, backend="reference", **opts)


@pytest.mark.parametrize("reference_layers", ["same", "final"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_intermediate_loss_equals_full_logits(loss_type, reference_layers):
    labels, hs, ref, w, w_ref = _data()
    lam = 0.3
    policy_layers = {k: hs[k].clone().requires_grad_() for k in (2, 4)}
    final_h = hs["final"].clone().requires_grad_()
    out = intermediate_dpo_loss(
        labels=labels, policy_hidden=final_h, policy_layer_hidden=policy_layers, lm_head_weight=w,
        ref_hidden=ref["final"], ref_layer_hidden={k: ref[k] for k in (2, 4)} if reference_layers == "same" else None,
        ref_lm_head_weight=w_ref, intermediate_weight=lam, loss_type=loss_type, beta=0.2, backend="torch",
    )
    ref_at = (lambda k: ref[k]) if reference_layers == "same" else (lambda k: ref["final"])
    manual_layers = {k: _full_logits_loss(labels, hs[k], ref_at(k), w, w_ref, loss_type=loss_type, beta=0.2).loss
                     for k in (2, 4)}
    manual_final = _full_logits_loss(labels, hs["final"], ref["final"], w, w_ref, loss_type=loss_type, beta=0.2).loss
    expected = (1 - lam) * manual_final + lam * (manual_layers[2] + manual_layers[4]) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert out.metrics["loss/layer_2"] == pytest.approx(manual_layers[2].item(), rel=1e-10)
    assert out.metrics["loss/final"] == pytest.approx(manual_final.item(), rel=1e-10)
    out.loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in (final_h, *policy_layers.values()))


def test_intermediate_validation():
    labels, hs, ref, w, w_ref = _data()
    common = dict(labels=labels, policy_hidden=hs["final"], lm_head_weight=w, ref_hidden=ref["final"],
                  ref_lm_head_weight=w_ref)
    with pytest.raises(ValueError, match="intermediate_weight must be in \\[0, 1\\]"):
        intermediate_dpo_loss(**common, policy_layer_hidden={2: hs[2]}, intermediate_weight=1.5)
    with pytest.raises(ValueError, match="at least one intermediate layer"):
        intermediate_dpo_loss(**common, policy_layer_hidden={})
    with pytest.raises(ValueError, match="ref_layer_hidden must have the layers"):
        intermediate_dpo_loss(**common, policy_layer_hidden={2: hs[2]}, ref_layer_hidden={4: ref[4]})
