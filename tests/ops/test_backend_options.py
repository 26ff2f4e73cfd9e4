"""``inplace_backward`` (from logits) and ``grad_filter_eps`` (from hidden states) on every backend that has them,
plus the Triton backend through ``fused_dpo_loss``."""

from __future__ import annotations

import pytest
import torch

from dpo_kernels import (
    BackendUnavailableError,
    fused_dpo_loss,
    linear_token_logprobs,
    linear_token_logprobs_and_kl,
    token_logprobs,
    token_logprobs_and_kl,
)

from ..conftest import assert_close, backends_under_test

INPLACE_BACKENDS = ["reference", *backends_under_test()]


def _head_and_logits(seed=0, rows=2, seq=5, d=8, v=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (rows, seq), generator=g)
    labels[0, 0] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_backward_gives_the_same_gradient_in_the_logits_storage(backend, with_kl):
    results = []
    for inplace in (False, True):
        hidden, weight, labels = _head_and_logits()
        logits = hidden @ weight.T  # a non-leaf: the LM head's output
        ref_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        captured = {}
        logits.register_hook(lambda grad: captured.setdefault("grad", grad))
        if with_kl:
            logp, _, kl = token_logprobs_and_kl(logits, ref_logits, labels, backend=backend, inplace_backward=inplace)
            (logp.sum() + 0.5 * kl.sum()).backward()
        else:
            token_logprobs(logits, labels, backend=backend, inplace_backward=inplace).sum().backward()
        results.append((hidden.grad, captured["grad"], logits.detach()))
    (h_grad, logit_grad, _), (h_grad_inplace, logit_grad_inplace, overwritten) = results
    assert_close(h_grad_inplace, h_grad, torch.float32, "hidden gradient through in-place backward")
    assert_close(logit_grad_inplace, logit_grad, torch.float32, "logits gradient")
    assert logit_grad_inplace.data_ptr() == overwritten.data_ptr(), "the gradient must live in the logits' storage"
    assert_close(overwritten, logit_grad, torch.float32, "the logits now hold their gradient")


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_backward_refuses_a_leaf(backend):
    logits = torch.randn(1, 3, 11, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward=True would write the gradient into logits"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long), backend=backend, inplace_backward=True)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_backward_invalidates_other_saved_uses(backend):
    """Another node that saved the logits and runs after the overwrite gets PyTorch's in-place error."""
    hidden, weight, labels = _head_and_logits()
    logits = hidden @ weight.T
    other = (logits**2).sum()  # saves logits; created first, so its backward runs after ours
    logp = token_logprobs(logits, labels, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


FILTER_BACKENDS = backends_under_test()


def _peaked_head(seed=3, n=96, d=16, v=300):
    """Logits dominated by the label, so most tiles have a negligible |softmax - onehot|."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.functional.normalize(torch.randn(v, d, generator=g), dim=1)
    labels = torch.randint(0, v, (1, n), generator=g)
    # z_label = 80 while every other logit is at most 80 * (largest cosine between head rows)
    hidden = weight[labels[0]] * 80.0 + 0.01 * torch.randn(n, d, generator=g)
    hidden[:8] /= 80.0  # a few flat distributions: the tiles holding them must not be skipped
    return hidden.unsqueeze(0), weight, labels


def _grads(fn, hidden, weight, upstream):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = fn(h, w)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs if o.requires_grad], [upstream[i] for i, o in enumerate(outs) if o.requires_grad])
    return h.grad, w.grad


@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("backend", FILTER_BACKENDS)
def test_grad_filter_error_bound(backend, with_kl):
    hidden, weight, labels = _peaked_head()
    ref_hidden = hidden + 0.05
    g = torch.Generator().manual_seed(9)
    upstream = [torch.randn(labels.shape, generator=g) for _ in range(3)]

    def call(eps):
        if with_kl:
            return lambda h, w: linear_token_logprobs_and_kl(
                h, w, ref_hidden, weight, labels, backend=backend, grad_filter_eps=eps, vocab_chunk_size=64,
                token_chunk_size=32,
            )
        return lambda h, w: linear_token_logprobs(
            h, w, labels, backend=backend, grad_filter_eps=eps, vocab_chunk_size=64, token_chunk_size=32
        )

    exact_h, exact_w = _grads(call(None), hidden, weight, upstream)
    zero_h, zero_w = _grads(call(0.0), hidden, weight, upstream)
    assert_close(zero_h, exact_h, torch.float32, "eps=0 skips nothing (dH)")
    assert_close(zero_w, exact_w, torch.float32, "eps=0 skips nothing (dW)")

    eps = 1e-3
    filt_h, filt_w = _grads(call(eps), hidden, weight, upstream)
    assert not torch.equal(filt_w, exact_w), "the filter must skip some tile in this peaked case"
    assert filt_h[0, :8].abs().sum() > 0, "tiles with flat distributions must be kept"
    # each skipped dz entry is at most eps * (|g| + |g_kl|): bound dH row-wise and dW column-wise
    g_abs = upstream[0].abs() + (upstream[2].abs() if with_kl else 0)
    bound_h = eps * g_abs.reshape(-1, 1) * weight.abs().sum(0)
    bound_w = eps * (g_abs.reshape(-1, 1) * hidden.reshape(-1, hidden.shape[-1]).abs()).sum(0)
    assert ((filt_h - exact_h).abs().reshape(-1, hidden.shape[-1]) <= bound_h + 1e-5).all()
    assert ((filt_w - exact_w).abs() <= bound_w + 1e-5).all()


def test_reference_refuses_grad_filter():
    hidden, weight, labels = _peaked_head()
    with pytest.raises(ValueError, match="backend='reference' is the exact oracle"):
        linear_token_logprobs(hidden, weight, labels, backend="reference", grad_filter_eps=1e-3)


@pytest.mark.skipif("triton" not in backends_under_test(), reason="the triton backend is not available here")
def test_triton_refuses_float64():
    hidden, weight, labels = _head_and_logits()
    with pytest.raises(BackendUnavailableError, match="takes float16, bfloat16, float32 inputs, got torch.float64"):
        linear_token_logprobs(hidden.double(), weight.double(), labels, backend="triton")


@pytest.mark.skipif("triton" not in backends_under_test(), reason="the triton backend is not available here")
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_fused_dpo_loss_on_triton_equals_torch(loss_type, form):
    g = torch.Generator().manual_seed(5)
    rows, seq, d, v = 4, 6, 16, 70
    labels = torch.randint(0, v, (rows, seq), generator=g)
    labels[:, :2] = -100
    hidden, ref_hidden = torch.randn(rows, seq, d, generator=g), torch.randn(rows, seq, d, generator=g)
    weight, ref_weight = torch.randn(v, d, generator=g) * 0.3, torch.randn(v, d, generator=g) * 0.3
    out = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if form == "logits":
            inputs = dict(policy_logits=h @ w.T, ref_logits=ref_hidden @ ref_weight.T)
        else:
            inputs = dict(policy_hidden=h, lm_head_weight=w, ref_hidden=ref_hidden, ref_lm_head_weight=ref_weight)
        res = fused_dpo_loss(labels=labels, loss_type=loss_type, beta=0.2, shift=True, backend=backend, **inputs)
        res.loss.backward()
        out[backend] = (res.loss.detach(), h.grad, w.grad, res.metrics)
    for a, b in zip(out["triton"][:3], out["torch"][:3], strict=True):
        assert_close(a, b, torch.float32, f"{loss_type} {form}")
    assert out["triton"][3] == pytest.approx(out["torch"][3], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("backend", ["reference", *backends_under_test()])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_double_backward_is_refused_clearly(backend, path):
    """``create_graph=True`` through a fused kernel raises one message saying what to do (before: PyTorch's
    "differentiate twice" error from hidden states, and from logits a gradient silently cut from the graph that failed
    later with "does not require grad"); the reference oracle, autograd through full logits, supports it."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    if path == "logits":
        z = h @ w.T
        logp, leaf = token_logprobs(z, labels, backend=backend), z
    else:
        logp, leaf = linear_token_logprobs(h, w, labels, backend=backend), h

    def second_order():
        grad, = torch.autograd.grad(logp.sum(), leaf, create_graph=True)
        grad.square().sum().backward()

    if backend == "reference":
        second_order()
        assert w.grad is not None and torch.isfinite(w.grad).all()
    else:
        with pytest.raises(RuntimeError, match="no double backward"):
            second_order()
