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

from ..conftest import backends_under_test

BACKENDS = ["reference", *backends_under_test()]
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logit_is_a_zero_probability(backend):
    """A ``-inf`` logit (a vocabulary entry masked out) is legitimate: everything stays finite and equals the
    oracle's."""
    h, w, ref_h, labels = _inputs()
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
