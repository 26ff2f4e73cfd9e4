"""The README's "Coming from Liger-Kernel, cut-cross-entropy or PyTorch's linear_cross_entropy" map, checked call
for call: each Liger-Kernel, cut-cross-entropy or PyTorch ``linear_cross_entropy`` call and its dpo_kernels
equivalent give the same loss (or per-token values) and gradients. Runs where those packages are installed (CI
installs them in its second pass; PyTorch's is in torch 2.13 itself)."""

from __future__ import annotations

import pytest
import torch

from dpo_kernels import fused_dpo_loss, linear_token_logprobs

B, T, D, V = 2, 10, 16, 50


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2 * B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    ref_h, ref_w = torch.randn(2 * B, T, D, generator=g), torch.randn(V, D, generator=g)
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[:, :3] = -100  # the prompt
    target[3, -2:] = -100  # padding
    return h, w, ref_h, ref_w, target


def _value_and_grads(loss: torch.Tensor, *leaves: torch.Tensor):
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, *leaves: torch.Tensor, atol: float = 1e-6) -> None:
    """The same value (to 1e-5) and the same gradients with respect to ``leaves`` (to 1e-4)."""
    expected, expected_grads = _value_and_grads(theirs, *leaves)
    got, grads = _value_and_grads(ours, *leaves)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("liger_options, options", [
    ({}, {}),
    ({"loss_type": "hinge"}, {"loss_type": "hinge"}),
    ({"average_log_prob": True}, {"average_log_prob": True}),
    ({"compute_nll_loss": True, "alpha": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
], ids=["sigmoid", "hinge", "average_log_prob", "nll"])
def test_liger_fused_linear_dpo_loss(liger_options, options):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed")
    h, w, ref_h, ref_w, target = _inputs()
    loss_fn = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, **liger_options)
    liger_out = loss_fn(w, h, target, ref_input=ref_h, ref_weight=ref_w)
    expected, expected_grads = _value_and_grads(liger_out[0], h, w)
    # Liger takes hidden states and targets already aligned: shift=False (the default) is the same convention
    out = fused_dpo_loss(policy_hidden=h, lm_head_weight=w, ref_hidden=ref_h, ref_lm_head_weight=ref_w, labels=target,
                         beta=0.1, backend="torch", **options)
    got, grads = _value_and_grads(out.loss, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    chosen_logps, rejected_logps = liger_out[1][0], liger_out[1][1]
    torch.testing.assert_close(out.chosen_logps.detach(), chosen_logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.detach(), rejected_logps.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shift", [False, True])
def test_cut_cross_entropy_linear_cross_entropy(reduction, shift):
    cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy is not installed")
    h, w, _, _, target = _inputs()
    impl = "cce" if h.is_cuda else "torch_compile"
    nll = cce.linear_cross_entropy(h, w, target, reduction=reduction, shift=shift, impl=impl)
    # CCE's shift=True scores targets[:, 1:] with e[:, :-1]; its "none" is the negative log-prob, 0 where ignored
    h_in, labels = (h[:, :-1], target[:, 1:]) if shift else (h, target)
    _assert_same_nll(nll, linear_token_logprobs(h_in, w, labels, backend="torch"), labels, reduction, h, w)


def _assert_same_nll(nll, logps, labels, reduction: str, h, w) -> None:
    """A peer's negative log-likelihood ``nll`` (``reduction`` as given) against the README's reduction of ours."""
    ours = {"none": -logps, "sum": -logps.sum(), "mean": -logps.sum() / (labels != -100).sum()}[reduction]
    if reduction == "none":
        torch.testing.assert_close(ours.detach(), nll.detach().reshape(ours.shape), rtol=1e-5, atol=1e-5)
    _assert_same(ours.sum(), nll.sum(), h, w, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunked", [False, True], ids=["reference_path", "chunked"])
def test_torch_linear_cross_entropy(reduction, chunked):
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13, the version this package
    installs), with and without its chunked ``LinearCrossEntropyOptions``: the README's row."""
    F = torch.nn.functional
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    h, w, _, _, target = _inputs()
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    nll = F.linear_cross_entropy(h.reshape(-1, D), w, target.reshape(-1), reduction=reduction, options=options)
    _assert_same_nll(nll, linear_token_logprobs(h, w, target), target, reduction, h, w)


def test_liger_fused_linear_orpo_loss():
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed")
    h, w, _, _, target = _inputs()
    theirs = liger.LigerFusedLinearORPOLoss(beta=0.3, compiled=False)(w, h, target)[0]
    ours = fused_dpo_loss(policy_hidden=h, lm_head_weight=w, labels=target, loss_type="orpo", beta=0.3,
                          backend="torch")
    _assert_same(ours.loss, theirs, h, w)


@pytest.mark.parametrize(("alpha", "label_smoothing"), [(1.0, 0.0), (0.5, 0.1)])
def test_liger_fused_linear_cpo_loss(alpha, label_smoothing):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed")
    h, w, _, _, target = _inputs()
    theirs = liger.LigerFusedLinearCPOLoss(beta=0.3, alpha=alpha, label_smoothing=label_smoothing, compiled=False)(
        w, h, target)[0]
    ours = fused_dpo_loss(policy_hidden=h, lm_head_weight=w, labels=target, loss_type="cpo", beta=0.3,
                          cpo_alpha=alpha, label_smoothing=label_smoothing, backend="torch")
    _assert_same(ours.loss, theirs, h, w)


def test_liger_fused_linear_kto_loss():
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed")
    from dpo_kernels import fused_kto_loss

    h, w, ref_h, ref_w, target = _inputs()
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.7)
    theirs = liger.LigerFusedLinearKTOLoss(beta=0.3, use_ref_model=True, compiled=False)(
        h, w, target, preference_labels=desirable, ref_input=ref_h, ref_weight=ref_w, kl=kl)[0]
    ours = fused_kto_loss(labels=target, desirable=desirable, policy_hidden=h, lm_head_weight=w, ref_hidden=ref_h,
                          ref_lm_head_weight=ref_w, kl=kl, beta=0.3, backend="torch")
    _assert_same(ours.loss, theirs, h, w)
