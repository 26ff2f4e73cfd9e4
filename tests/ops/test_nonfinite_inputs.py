"""One rule on every backend for inputs no model should produce (MATH.md §1, "Non-finite inputs and bad labels"):

- a NaN or +inf logit (or a hidden state that makes one) leaves its token without a softmax: that token's log-prob,
  reference log-prob and KL are NaN, and so is any loss over it; never a plausible finite number, and never a
  ``-inf`` log-prob that would let its pair drop out of a DPO loss;
- a ``-inf`` logit is a legitimate probability 0 and changes nothing else;
- with ``check_labels=False`` an out-of-range label gives NaN for its token, never a crash or a finite number.

The other tokens are unaffected in every case.
"""

from __future__ import annotations

import pytest
import torch

from dpo_kernels import (
    fused_dpo_loss,
    linear_token_logprobs,
    linear_token_logprobs_and_kl,
    token_logprobs,
    token_logprobs_and_kl,
)

from dpo_kernels.ops import backends_for

from ..conftest import backends_under_test

BACKENDS = ["reference", *backends_under_test()]
# the same cases on CUDA tensors where a GPU is present (the GPU backends' kernels; Triton runs under its
# interpreter on CPU tensors above)
GPU_BACKENDS = [b for b in backends_for("cuda") if b != "torch"] if torch.cuda.is_available() else []
ON_DEVICES = ([pytest.param(b, "cpu", id=b) for b in BACKENDS]
              + [pytest.param(b, "cuda", id=f"{b}-cuda") for b in GPU_BACKENDS])
R, T, D, V = 4, 6, 16, 40
POISONED = (1, 2)  # the token whose input is made non-finite


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    ref_h = h + 0.3 * torch.randn(R, T, D, generator=g)
    labels = torch.randint(0, V, (R, T), generator=g)
    return h, w, ref_h, labels


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[POISONED][3] = value
    return x


def _others(x: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape, dtype=torch.bool)
    keep[POISONED] = False
    return x[keep]


def _check(poisoned_outs, clean_outs, nan_expected):
    for name, got, clean, nan in zip(("logp", "ref_logp", "kl"), poisoned_outs, clean_outs, nan_expected):
        assert bool(torch.isnan(got[POISONED])) == nan, (name, got[POISONED].item())
        torch.testing.assert_close(_others(got), _others(clean), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("side", ["policy", "reference"])
def test_non_finite_logits_give_nan(backend, value, side):
    h, w, ref_h, labels = _inputs()
    z, zr = h @ w.T, ref_h @ w.T
    clean = token_logprobs_and_kl(z, zr, labels, backend=backend)
    if side == "policy":
        got = token_logprobs_and_kl(_poison(z, value), zr, labels, backend=backend)
        _check(got, clean, (True, False, True))
        lp = token_logprobs(_poison(z, value), labels, backend=backend)
        assert torch.isnan(lp[POISONED]) and torch.isfinite(_others(lp)).all()
    else:
        got = token_logprobs_and_kl(z, _poison(zr, value), labels, backend=backend)
        _check(got, clean, (False, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("side", ["policy", "reference"])
def test_non_finite_hidden_states_give_nan(backend, value, side):
    """An infinite hidden state makes logits of both signs (the weight has both), so even ``-inf`` poisons its
    token here; the fused loss over it is NaN, where it used to drop the pair silently on the ``cpu`` backend."""
    h, w, ref_h, labels = _inputs()
    clean = linear_token_logprobs_and_kl(h, w, ref_h, w, labels, backend=backend)
    if side == "policy":
        got = linear_token_logprobs_and_kl(_poison(h, value), w, ref_h, w, labels, backend=backend)
        _check(got, clean, (True, False, True))
        lp = linear_token_logprobs(_poison(h, value), w, labels, backend=backend)
        assert torch.isnan(lp[POISONED]) and torch.isfinite(_others(lp)).all()
    else:
        got = linear_token_logprobs_and_kl(h, w, _poison(ref_h, value), w, labels, backend=backend)
        _check(got, clean, (False, True, True))
    policy_h, reference_h = (_poison(h, value), ref_h) if side == "policy" else (h, _poison(ref_h, value))
    loss = fused_dpo_loss(labels=labels, policy_hidden=policy_h, lm_head_weight=w, ref_hidden=reference_h,
                          ref_lm_head_weight=w, backend=backend).loss
    assert torch.isnan(loss), loss.item()


@pytest.mark.parametrize(("backend", "device"), ON_DEVICES)
def test_minus_inf_logit_is_a_zero_probability(backend, device):
    """A ``-inf`` logit (a vocabulary entry masked out) is legitimate: everything stays finite and equals the
    oracle's."""
    h, w, ref_h, labels = (t.to(device) for t in _inputs())
    z, zr = h @ w.T, ref_h @ w.T
    labels[POISONED] = 5  # not the masked column
    got = token_logprobs_and_kl(_poison(z, -float("inf")), _poison(zr, -float("inf")), labels, backend=backend)
    expected = token_logprobs_and_kl(_poison(z.double(), -float("inf")), _poison(zr.double(), -float("inf")),
                                     labels, backend="reference")
    for g_, e in zip(got, expected):
        assert torch.isfinite(g_).all()
        torch.testing.assert_close(g_.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_label", [V, V + 1000, -7])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_out_of_range_label_without_check_gives_nan(backend, bad_label, path):
    """``check_labels=False`` skips the range check: an out-of-range label must not crash the process (the ``cpu``
    backend segfaulted from logits) nor return a finite number (the linear path did); its token is NaN, the
    others exact, and the backward runs."""
    h, w, ref_h, labels = _inputs()
    bad = labels.clone()
    bad[POISONED] = bad_label
    if path == "logits":
        z = (h @ w.T).requires_grad_()
        got = token_logprobs_and_kl(z, ref_h @ w.T, bad, backend=backend, check_labels=False)
        clean = token_logprobs_and_kl(z, ref_h @ w.T, labels, backend=backend)
        leaf = z
    else:
        hh = h.clone().requires_grad_()
        got = linear_token_logprobs_and_kl(hh, w, ref_h, w, bad, backend=backend, check_labels=False)
        clean = linear_token_logprobs_and_kl(hh, w, ref_h, w, labels, backend=backend)
        leaf = hh
    _check(got, clean, (True, True, False))
    grad, = torch.autograd.grad(_others(got[0]).sum() + got[2].sum(), leaf)
    assert grad.shape == leaf.shape


@pytest.mark.parametrize(("backend", "device"), ON_DEVICES)
@pytest.mark.parametrize("width", [1, 2500], ids=["column0", "first_block"])
def test_minus_inf_leading_columns_are_zero_probabilities(backend, device, width):
    """Issue 27: a running max that starts at ``-inf`` met a first logit of ``-inf`` and computed
    ``exp(-inf - -inf)`` = NaN (CUDA from a ``-inf`` in column 0, Triton from a whole first block of them). Every
    row here starts with ``width`` ``-inf`` columns; values and gradients equal the float64 oracle's."""
    g = torch.Generator().manual_seed(3)
    v = 3000
    z = torch.randn(R, T, v, generator=g) * 2
    zr = torch.randn(R, T, v, generator=g) * 2
    z[..., :width] = -float("inf")
    zr[..., :width] = -float("inf")
    labels = torch.randint(width, v, (R, T), generator=g)
    labels[0, :2] = -100
    z, zr, labels = z.to(device), zr.to(device), labels.to(device)
    outs, grads = {}, {}
    for key, be, dtype in (("got", backend, torch.float32), ("oracle", "reference", torch.float64)):
        leaf = z.detach().to(dtype).clone().requires_grad_()
        logp, ref_logp, kl = token_logprobs_and_kl(leaf, zr.to(dtype), labels, backend=be)
        (logp.sum() + kl.sum()).backward()
        outs[key], grads[key] = (logp, ref_logp, kl), leaf.grad
    for got, expected in zip(outs["got"], outs["oracle"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grads["got"]).all()
    assert (grads["got"][..., :width] == 0).all()
    torch.testing.assert_close(grads["got"].double(), grads["oracle"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("backend", "device"), ON_DEVICES)
def test_a_minus_inf_bias_is_a_zero_probability_on_the_linear_path(backend, device):
    """Issue 27: a ``-inf`` bias entry (a vocabulary entry switched off) poisoned the CUDA tile kernels."""
    h, w, ref_h, labels = (t.to(device) for t in _inputs())
    bias = torch.zeros(V, device=device)
    bias[0] = bias[7] = -float("inf")
    labels[labels == 0] = 1
    labels[labels == 7] = 2
    got = linear_token_logprobs_and_kl(h, w, ref_h, w, labels, bias=bias, ref_bias=bias, backend=backend)
    expected = linear_token_logprobs_and_kl(h.double(), w.double(), ref_h.double(), w.double(), labels,
                                            bias=bias.double(), ref_bias=bias.double(), backend="reference")
    for g_, e in zip(got, expected):
        assert torch.isfinite(g_).all()
        torch.testing.assert_close(g_.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), ON_DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_garbage_at_masked_positions_gets_exactly_zero_gradient_from_logits(backend, device, value):
    """Issue 27 / MATH.md §1: a masked position contributes nothing and receives exactly 0 gradient, whatever its
    logits hold (padding can produce NaN): the loss and every other gradient are the clean ones."""
    h, w, ref_h, labels = (t.to(device) for t in _inputs())
    labels[POISONED] = -100
    labels[0, :2] = -100
    z, zr = h @ w.T, ref_h @ w.T
    results = {}
    for name, (logits, ref_logits) in {"clean": (z, zr), "poisoned": (_poison(z, value), _poison(zr, value))}.items():
        leaf = logits.clone().requires_grad_()
        out = fused_dpo_loss(labels=labels, policy_logits=leaf, ref_logits=ref_logits, loss_type="tdpo2",
                             backend=backend)
        out.loss.backward()
        results[name] = (out.loss.detach(), leaf.grad)
    (loss, grad), (clean_loss, clean_grad) = results["poisoned"], results["clean"]
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, int(torch.isnan(grad).sum()))
    assert (grad[labels == -100] == 0).all()
    torch.testing.assert_close(loss, clean_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("backend", "device"), ON_DEVICES)
@pytest.mark.parametrize("schedule", ["eager", "recompute"])
def test_garbage_hidden_states_at_masked_positions_change_nothing(backend, device, schedule):
    """Issue 27: one NaN hidden state at a masked position gave the whole head a NaN gradient on the oracle."""
    h, w, ref_h, labels = (t.to(device) for t in _inputs())
    labels[POISONED] = -100
    labels[0, :2] = -100
    results = {}
    for name, (hidden, ref_hidden) in {"clean": (h, ref_h),
                                       "poisoned": (_poison(h, float("nan")), _poison(ref_h, float("inf")))}.items():
        hh, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        out = fused_dpo_loss(labels=labels, policy_hidden=hh, lm_head_weight=ww, ref_hidden=ref_hidden,
                             ref_lm_head_weight=w, loss_type="tdpo2", backend=backend,
                             schedule="recompute" if backend == "reference" else schedule)
        out.loss.backward()
        results[name] = (out.loss.detach(), hh.grad, ww.grad)
    for got, clean, what in zip(results["poisoned"], results["clean"], ("loss", "dH", "dW")):
        assert torch.isfinite(got).all(), what
        torch.testing.assert_close(got, clean, rtol=1e-5, atol=1e-7, msg=what)
    assert (results["poisoned"][1][labels == -100] == 0).all()
