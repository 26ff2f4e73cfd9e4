"""``fused_kto_loss`` (issue 30): KTO and its unpaired APO-zero variant, against float64 autograd through full logits
(every backend, from hidden states and from logits, with a bias, the causal shift and weights), against TRL 1.16's
``KTOTrainer`` loss as written there (transcribed: it is inline in its ``_compute_loss``), with precomputed
reference and KL log-probs, and its input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpo_kernels import fused_kto_loss
from dpo_kernels.ops import registry

N, M, T, D, V = 6, 5, 9, 12, 70


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def labels(rows):
        y = torch.randint(0, V, (rows, T), generator=g)
        y[:, :3] = -100  # prompts
        y[1, 6:] = -100  # padding
        return y

    return dict(
        labels=labels(N), desirable=torch.tensor([True, False, True, True, False, False]),
        policy_hidden=torch.randn(N, T, D, generator=g, dtype=dtype), lm_head_weight=torch.randn(V, D, generator=g,
                                                                                               dtype=dtype) * 0.4,
        lm_head_bias=torch.randn(V, generator=g, dtype=dtype) * 0.1,
        ref_hidden=torch.randn(N, T, D, generator=g, dtype=dtype),
        ref_lm_head_weight=torch.randn(V, D, generator=g, dtype=dtype) * 0.4,
        kl_labels=labels(M), kl_policy_hidden=torch.randn(M, T, D, generator=g, dtype=dtype),
        # a sharper reference on the KL batch: lower log-probs of its random labels, so the KL estimate is > 0
        kl_ref_hidden=torch.randn(M, T, D, generator=g, dtype=dtype) * 3,
    )


def _seq_logps(logits, labels, shift):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def _expected(d, loss_type, beta, wd, wu, shift):
    """float64 autograd through full logits, TRL 1.16's KTOTrainer loss as written there."""
    h = d["policy_hidden"].double().requires_grad_()
    w = d["lm_head_weight"].double().requires_grad_()
    b = d["lm_head_bias"].double().requires_grad_()
    logps = _seq_logps(h @ w.T + b, d["labels"], shift)
    ref = _seq_logps(d["ref_hidden"].double() @ d["ref_lm_head_weight"].double().T, d["labels"], shift)
    with torch.no_grad():
        kl_p = _seq_logps(d["kl_policy_hidden"].double() @ w.T + b, d["kl_labels"], shift)
        kl_r = _seq_logps(d["kl_ref_hidden"].double() @ d["ref_lm_head_weight"].double().T, d["kl_labels"], shift)
    kl = (kl_p - kl_r).mean().detach().clamp(min=0) if loss_type == "kto" else torch.zeros((), dtype=torch.float64)
    desirable = d["desirable"]
    chosen_lr, rejected_lr = (logps - ref)[desirable], (logps - ref)[~desirable]
    if loss_type == "kto":
        chosen = 1 - F.sigmoid(beta * (chosen_lr - kl))
        rejected = 1 - F.sigmoid(beta * (kl - rejected_lr))
    else:
        chosen = 1 - F.sigmoid(beta * chosen_lr)
        rejected = F.sigmoid(beta * rejected_lr)
    loss = torch.cat((wd * chosen, wu * rejected)).nanmean()
    grads = torch.autograd.grad(loss, (h, w, b))
    return loss.detach(), logps.detach(), kl, grads


def _ours(d, dtype, backend, from_logits=False, **kw):
    leaves = {k: d[k].to(dtype).clone().requires_grad_() for k in ("policy_hidden", "lm_head_weight", "lm_head_bias")}
    common = dict(labels=d["labels"], desirable=d["desirable"], kl_labels=d["kl_labels"], backend=backend, **kw)
    if from_logits:
        logits = leaves["policy_hidden"] @ leaves["lm_head_weight"].T + leaves["lm_head_bias"]
        out = fused_kto_loss(policy_logits=logits, ref_logits=(d["ref_hidden"] @ d["ref_lm_head_weight"].T).to(dtype),
                             kl_policy_logits=(d["kl_policy_hidden"] @ d["lm_head_weight"].T
                                               + d["lm_head_bias"]).to(dtype),
                             kl_ref_logits=(d["kl_ref_hidden"] @ d["ref_lm_head_weight"].T).to(dtype), **common)
    else:
        out = fused_kto_loss(policy_hidden=leaves["policy_hidden"], lm_head_weight=leaves["lm_head_weight"],
                             lm_head_bias=leaves["lm_head_bias"], ref_hidden=d["ref_hidden"].to(dtype),
                             ref_lm_head_weight=d["ref_lm_head_weight"].to(dtype),
                             kl_policy_hidden=d["kl_policy_hidden"].to(dtype),
                             kl_ref_hidden=d["kl_ref_hidden"].to(dtype), **common)
    grads = torch.autograd.grad(out.loss, tuple(leaves.values()))
    return out, grads


def _close(got, expected, rtol, what):
    scale = expected.abs().max().clamp(min=1e-30)
    err = ((got.detach().double() - expected.double()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("from_logits", [False, True], ids=["hidden", "logits"])
@pytest.mark.parametrize(("loss_type", "shift", "weights"), [
    ("kto", False, (1.0, 1.0)), ("kto", True, (1.33, 0.75)), ("apo_zero_unpaired", False, (1.0, 2.0))])
def test_matches_float64_autograd_through_full_logits(backend, loss_type, shift, weights, from_logits):
    # fp64 where the backend takes it (exact to 1e-10); Triton fp32, where the sums over ~30 tokens and the sigmoids
    # leave a few 1e-5 of the largest gradient
    dtype = torch.float64 if registry._BACKENDS[backend].takes((torch.float64,)) else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 5e-5
    # the expected values from the same rounded inputs
    d = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in _data().items()}
    beta = 0.3
    loss, logps, kl, grads = _expected(d, loss_type, beta, *weights, shift)
    out, got = _ours(d, dtype, backend, from_logits, loss_type=loss_type, beta=beta, desirable_weight=weights[0],
                     undesirable_weight=weights[1], shift=shift)
    _close(out.loss, loss, rtol, "loss")
    _close(out.logps, logps, rtol, "logps")
    if loss_type == "kto":
        assert kl.item() > 0, "a KL estimate of 0 would not test the KL term"
        _close(out.kl, kl, rtol, "kl")
    else:
        assert out.kl.item() == 0
    names = ("policy_hidden", "lm_head_weight", "lm_head_bias")
    for name, g, e in zip(names, got, grads, strict=True):  # from logits: through the logits built from them
        _close(g, e, rtol, f"d{name}")
    torch.testing.assert_close(out.rewards, (0.3 * (out.logps - out.ref_logps)).detach())
    assert out.metrics["rewards/margins"].item() == pytest.approx(
        (out.metrics["rewards/chosen"] - out.metrics["rewards/rejected"]).item())


def test_the_eager_schedule_of_a_trainable_head_matches_and_recomputes_nothing(backend):
    """``schedule="eager"`` (the per-token functions' eager schedule for the policy's trainable head): the same loss
    and gradients as the oracle, and GEMM work ``6 n D V`` for the policy plus ``2 n D V`` for its reference in the
    same pass and ``4 m D V`` for the KL batch's two heads without gradient (the recompute schedule: 2 more for the
    policy's tiles recomputed in the backward)."""
    from .ops.test_eager_schedule import _GemmCounter

    dtype = torch.float64 if registry._BACKENDS[backend].takes((torch.float64,)) else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 5e-5
    d = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in _data().items()}
    loss, _, _, grads = _expected(d, "kto", 0.3, 1.0, 1.0, False)
    flops = {}
    for schedule in ("eager", "recompute"):
        with _GemmCounter() as counter:
            out, got = _ours(d, dtype, backend, beta=0.3, schedule=schedule)
        flops[schedule] = counter.flops
        _close(out.loss, loss, rtol, f"{schedule} loss")
        for g, e in zip(got, grads, strict=True):
            _close(g, e, rtol, f"{schedule} gradient")
    n, m = int((d["labels"] != -100).sum()), int((d["kl_labels"] != -100).sum())
    assert flops == {"eager": (8 * n + 4 * m) * D * V, "recompute": (10 * n + 4 * m) * D * V}, flops
    with pytest.raises(ValueError, match="schedule must be one of"):
        _ours(d, dtype, backend, schedule="often")


def test_precomputed_reference_and_kl_log_probs_give_the_same_loss():
    d = _data(torch.float32)
    full, _ = _ours(d, torch.float32, "torch")
    with torch.no_grad():
        kl_p = _seq_logps(d["kl_policy_hidden"] @ d["lm_head_weight"].T + d["lm_head_bias"], d["kl_labels"], False)
        kl_r = _seq_logps(d["kl_ref_hidden"] @ d["ref_lm_head_weight"].T, d["kl_labels"], False)
    h = d["policy_hidden"].clone().requires_grad_()
    out = fused_kto_loss(labels=d["labels"], desirable=d["desirable"], policy_hidden=h,
                         lm_head_weight=d["lm_head_weight"], lm_head_bias=d["lm_head_bias"], ref_logps=full.ref_logps,
                         kl_logps=kl_p, kl_ref_logps=kl_r, backend="torch")
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.kl, full.kl, rtol=1e-5, atol=1e-7)


def test_the_kl_estimate_is_clamped_at_zero_and_carries_no_gradient():
    d = _data(torch.float32)
    d["kl_ref_hidden"] = d["kl_policy_hidden"].clone()
    d["ref_lm_head_weight"] = d["lm_head_weight"] * 1.0
    out, _ = _ours(d, torch.float32, "torch")
    # the policy has a bias the reference lacks: the raw mean may be of either sign; clamped it is >= 0
    assert out.kl.item() >= 0 and not out.kl.requires_grad


@pytest.mark.parametrize(("change", "match"), [
    (dict(loss_type="ipo"), "loss_type must be one of"),
    (dict(beta=0.0), "beta"),
    (dict(desirable_weight=-1.0), "desirable_weight must be a finite number >= 0"),
    (dict(desirable=torch.tensor([1, 0, 1, 1, 0, 0])), "desirable must be a bool tensor"),
    (dict(kl_labels=None, kl_policy_hidden=None, kl_ref_hidden=None), "estimates its KL term"),
    (dict(ref_hidden=None), "give the reference as exactly one of"),
    (dict(chunk=3), "unexpected keyword"),
    (dict(kl=float("nan")), "kl must be a finite number"),
    (dict(kl=0.5, loss_type="apo_zero_unpaired"), "takes none"),
])
def test_bad_input_is_refused_by_name(change, match):
    d = _data(torch.float32)
    kwargs = dict(labels=d["labels"], desirable=d["desirable"], policy_hidden=d["policy_hidden"],
                  lm_head_weight=d["lm_head_weight"], ref_hidden=d["ref_hidden"],
                  ref_lm_head_weight=d["ref_lm_head_weight"], kl_labels=d["kl_labels"],
                  kl_policy_hidden=d["kl_policy_hidden"], kl_ref_hidden=d["kl_ref_hidden"], backend="torch")
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_kto_loss(**kwargs)


def test_apo_zero_unpaired_needs_no_kl_batch():
    d = _data(torch.float32)
    out = fused_kto_loss(labels=d["labels"], desirable=d["desirable"], policy_hidden=d["policy_hidden"],
                         lm_head_weight=d["lm_head_weight"], ref_hidden=d["ref_hidden"],
                         ref_lm_head_weight=d["ref_lm_head_weight"], loss_type="apo_zero_unpaired", backend="torch")
    assert out.kl.item() == 0 and torch.isfinite(out.loss)


def test_a_given_kl_estimate_is_used_as_given():
    d = _data(torch.float32)
    kwargs = dict(labels=d["labels"], desirable=d["desirable"], policy_hidden=d["policy_hidden"],
                  lm_head_weight=d["lm_head_weight"], lm_head_bias=d["lm_head_bias"], ref_hidden=d["ref_hidden"],
                  ref_lm_head_weight=d["ref_lm_head_weight"], backend="torch")
    full, _ = _ours(d, torch.float32, "torch")
    given = fused_kto_loss(kl=full.kl, **kwargs)
    torch.testing.assert_close(given.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert fused_kto_loss(kl=0.0, **kwargs).kl.item() == 0
