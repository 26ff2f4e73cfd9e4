"""The reference backend against a hand-written float64 NumPy computation of MATH.md §1, token by token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo_kernels.ops import reference
from dpo_kernels.ops.common import LinearHead
from dpo_kernels.options import TokenOptions


def _numpy_token(z_row: np.ndarray, label: int, opts: TokenOptions) -> tuple[np.ndarray, float, float]:
    z = z_row * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * np.tanh(z / opts.softcap)
    z = z / opts.temperature
    m = z.max()
    lse = m + math.log(np.exp(z - m).sum())
    return z, lse, z[label] - lse


def _numpy_logprobs_and_kl(logits, ref_logits, labels, opts):
    rows, seq, _ = logits.shape
    logp, ref_logp, kl = (np.zeros((rows, seq)) for _ in range(3))
    for r in range(rows):
        for t in range(seq):
            y = labels[r, t]
            if y == opts.ignore_index:
                continue
            z, lse, logp[r, t] = _numpy_token(logits[r, t], y, opts)
            zr, lse_r, ref_logp[r, t] = _numpy_token(ref_logits[r, t], y, opts)
            q = np.exp(zr - lse_r)
            kl[r, t] = float(np.sum(q * ((zr - lse_r) - (z - lse))))
    return logp, ref_logp, kl


@pytest.mark.parametrize(
    "opts",
    [TokenOptions(), TokenOptions(softcap=3.0, temperature=0.7, logit_scale=1.5), TokenOptions(ignore_index=5)],
    ids=["plain", "transformed", "ignore5"],
)
def test_reference_matches_numpy(opts):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64) * 3
    ref_logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 4), generator=g)
    labels[0, 1] = opts.ignore_index
    expected = _numpy_logprobs_and_kl(logits.numpy(), ref_logits.numpy(), labels.numpy(), opts)
    got = reference.token_logprobs_and_kl(logits, ref_logits, labels, opts)
    for name, g_, e in zip(("logp", "ref_logp", "kl"), got, expected, strict=True):
        np.testing.assert_allclose(g_.numpy(), e, rtol=1e-12, atol=1e-12, err_msg=name)
    assert (got[2] >= -1e-12).all(), "KL(ref || policy) is non-negative"


def test_reference_gradient_is_onehot_minus_softmax():
    """d logp / d z = onehot - softmax, and d KL / d z = softmax - q (MATH.md §1), via autograd."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(1, 3, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 6, 0]])
    logp, _, kl = reference.token_logprobs_and_kl(logits, ref_logits, labels, TokenOptions())
    (grad_logp,) = torch.autograd.grad(logp.sum(), logits, retain_graph=True)
    (grad_kl,) = torch.autograd.grad(kl.sum(), logits)
    p, q = logits.detach().softmax(-1), ref_logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(labels, 7).double()
    torch.testing.assert_close(grad_logp, onehot - p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_kl, p - q, rtol=1e-12, atol=1e-12)


def test_reference_kl_underflowed_reference_probability_contributes_zero():
    """A reference probability that underflows to 0 adds 0 (xlogy), even against -inf policy logits: no NaN."""
    logits = torch.tensor([[[0.0, 1.0, float("-inf")]]], dtype=torch.float64)
    ref_logits = torch.tensor([[[0.0, 1.0, -1e5]]], dtype=torch.float64)
    _, _, kl = reference.token_logprobs_and_kl(logits, ref_logits, torch.tensor([[0]]), TokenOptions())
    assert torch.isfinite(kl).all() and abs(kl.item()) < 1e-12


def test_reference_linear_equals_logits_path():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 3), generator=g)
    opts = TokenOptions()
    via_head = reference.linear_token_stats(LinearHead(hidden, weight, bias), None, labels, opts)
    via_logits = reference.token_logprobs(hidden @ weight.T + bias, labels, opts)
    torch.testing.assert_close(via_head, via_logits, rtol=1e-12, atol=1e-12)
    ref = LinearHead(hidden.flip(0), weight, None)
    _, ref_logp, _ = reference.linear_token_stats(LinearHead(hidden, weight, bias), ref, labels, opts)
    torch.testing.assert_close(ref_logp, reference.token_logprobs(hidden.flip(0) @ weight.T, labels, opts))
