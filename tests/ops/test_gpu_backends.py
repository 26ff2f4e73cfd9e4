"""The GPU backends (``cuda``, ``triton``) on CUDA tensors against the reference backend on the same device.

Skipped without a CUDA device. On CPU machines the Triton kernels are covered through the interpreter by
``test_primitives.py``, and the CUDA C++ kernels are compiled (not run) by ``compile_check --cuda`` in CI.
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

from ..conftest import assert_close, compare_with_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [name for name in backends_for("cuda") if name != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 17, 1000, 48), (2, 5, 32001, 64), (2, 9, 128256, 32)]  # (rows, seq, vocab, hidden)


def _inputs(rows, seq, vocab, hidden, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cuda = dict(device="cuda", generator=g)
    labels = torch.randint(0, vocab, (rows, seq), **cuda)
    labels[0, :3] = -100
    labels[-1, -1] = -100
    return dict(
        labels=labels,
        logits=(torch.randn(rows, seq, vocab, **cuda) * 3).to(dtype),
        ref_logits=(torch.randn(rows, seq, vocab, **cuda) * 3).to(dtype),
        hidden=torch.randn(rows, seq, hidden, **cuda).to(dtype),
        weight=(torch.randn(vocab, hidden, **cuda) / hidden**0.5).to(dtype),
        bias=(torch.randn(vocab, **cuda) * 0.1).to(dtype),
        ref_hidden=torch.randn(rows, seq, hidden, **cuda).to(dtype),
        ref_weight=(torch.randn(vocab, hidden, **cuda) / hidden**0.5).to(dtype),
    )


def _compare(fn, x, wrt, backend, dtype):
    """``fn(leaves, labels, backend)`` against the oracle with the comparison of ``test_primitives``."""
    compare_with_reference(lambda t, be: fn(t, x["labels"], be), x, wrt, backend, dtype, x["labels"] != -100)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_from_logits(backend, dtype, shape):
    x = _inputs(*shape, dtype)
    opts = dict(softcap=30.0, temperature=0.8)
    _compare(lambda t, y, be: token_logprobs(t["logits"], y, backend=be, **opts), x, ("logits",), backend, dtype)
    _compare(lambda t, y, be: token_logprobs_and_kl(t["logits"], t["ref_logits"], y, backend=be, **opts), x,
             ("logits",), backend, dtype)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"V{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_from_hidden_states(backend, dtype, shape):
    x = _inputs(*shape, dtype)
    _compare(lambda t, y, be: linear_token_logprobs(t["hidden"], t["weight"], y, bias=t["bias"], backend=be), x,
             ("hidden", "weight", "bias"), backend, dtype)
    _compare(lambda t, y, be: linear_token_logprobs_and_kl(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"],
                                                           y, bias=t["bias"], backend=be),
             x, ("hidden", "weight", "bias"), backend, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inplace_backward_and_fused_loss(backend):
    x = _inputs(4, 6, 5000, 32, torch.bfloat16)
    hidden = x["hidden"].float().requires_grad_()
    logits = (hidden @ x["weight"].float().T)
    token_logprobs(logits, x["labels"], backend=backend, inplace_backward=True).sum().backward()
    expected = hidden.detach().clone().requires_grad_()
    token_logprobs(expected @ x["weight"].float().T, x["labels"], backend="reference").sum().backward()
    assert_close(hidden.grad, expected.grad, torch.float32, "in-place backward")
    out = fused_dpo_loss(labels=x["labels"], policy_hidden=x["hidden"], lm_head_weight=x["weight"],
                         ref_hidden=x["ref_hidden"], ref_lm_head_weight=x["ref_weight"], loss_type="tdpo2",
                         backend=backend)
    ref = fused_dpo_loss(labels=x["labels"], policy_hidden=x["hidden"], lm_head_weight=x["weight"],
                         ref_hidden=x["ref_hidden"], ref_lm_head_weight=x["ref_weight"], loss_type="tdpo2",
                         backend="reference")
    assert_close(out.loss, ref.loss, torch.bfloat16, "fused TDPO2 loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_products_stay_half_on_cuda(dtype):
    """cuBLAS takes the half operands as they are and writes fp32 (tensor cores); fp32 accumulation into an fp32
    buffer works one way or the other (``addmm(out_dtype=...)`` or mm + add)."""
    from dpo_kernels.ops.linear import products

    h = torch.randn(8, 16, device="cuda", dtype=dtype)
    p = products.Products.in_dtype(products.product_dtype(h, h), "cuda", torch.float32)
    assert p.operand_dtype == dtype and p.out_dtype == torch.float32
    acc = torch.zeros(8, 8, device="cuda")
    p.accumulate(acc, h, h.T)
    torch.testing.assert_close(acc, h.float() @ h.float().T, rtol=1e-5, atol=1e-5)
    out = torch.empty(8, 8, device="cuda", dtype=dtype)
    assert p.write(out, h, h.T)
    torch.testing.assert_close(out.float(), h.float() @ h.float().T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_token_blocks_and_logged_statistics_on_cuda(backend, dtype):
    """Several token blocks (fp32 weight-gradient buffers per chunk) and the logged statistics, against the oracle."""
    from dpo_kernels.ops.common import LinearHead
    from dpo_kernels.ops.dispatch import linear_stats
    from dpo_kernels.options import TokenOptions

    def run_linear_token_stats(*args, **kwargs):
        out = linear_stats(*args, **kwargs)
        return out.logp, out.logged

    x = _inputs(4, 33, 5000, 64, dtype)
    _compare(lambda t, y, be: linear_token_logprobs(t["hidden"], t["weight"], y, bias=t["bias"], backend=be,
                                                    token_chunk_size=37, vocab_chunk_size=1024),
             x, ("hidden", "weight", "bias"), backend, dtype)
    opts = TokenOptions(softcap=30.0, vocab_chunk_size=1024)
    head = LinearHead(x["hidden"], x["weight"], x["bias"])
    _, expected = run_linear_token_stats(head, None, x["labels"], opts, "reference", logging=True)
    _, logged = run_linear_token_stats(head, None, x["labels"], opts, backend, logging=True)
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(logged[name], expected[name], dtype, name)


@pytest.mark.parametrize("with_ref", [False, True], ids=["policy", "with_kl"])
@pytest.mark.parametrize("weights_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_fold_shifted_matches_the_fallback_on_cuda(backend, weights_dtype, with_ref):
    """The frozen head's and the scaled store's fold at lazily moved shifts (``test_frozen_shift.py``'s case: spikes
    that move a shift late in a tile and in a later one, a masked first block) on CUDA tensors."""
    from .test_frozen_shift import check_fold_shifted

    check_fold_shifted(backend, with_ref, weights_dtype, 30.0, "cuda")


@pytest.mark.parametrize("with_ref", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_scaled_grad_matches_the_pytorch_ops_on_cuda(backend, with_ref):
    """``dZ`` from a scaled store's fp16 weights (``test_scaled_store.py``'s case) on CUDA tensors."""
    from .test_scaled_store import check_scaled_grad

    check_scaled_grad(backend, with_ref, {"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}, "cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_batched_hidden_gradient_runs_on_cuda(backend, monkeypatch):
    """Issue 29's batched ``dH`` products on the device: ``torch.baddbmm`` with an fp32 output over bf16 operands
    (probed: ``batches_into_float``), the first run writing the partials, each run's ``dZ`` in the fp32 tile
    scratch. Forced to runs of 2 at a small shape (the plan takes them only where a batch fills the waves better),
    against one chunk at a time: the same bf16 operands, only the order of ``dH``'s fp32 sum differs."""
    from dpo_kernels.ops.linear import plan, products

    assert products.batches_into_float("cuda", torch.bfloat16), "baddbmm(out_dtype=float32) is unavailable here"
    x = _inputs(4, 64, 32000, 256, torch.bfloat16)
    calls = []
    original = products.Products.accumulate_batched

    def spy(self, acc, a, b, fresh=False):
        calls.append((tuple(a.shape), fresh))
        return original(self, acc, a, b, fresh=fresh)

    def run():
        hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
        out = fused_dpo_loss(labels=x["labels"], policy_hidden=hidden, lm_head_weight=weight,
                             ref_hidden=x["ref_hidden"], ref_lm_head_weight=x["ref_weight"], backend=backend,
                             schedule="eager", vocab_chunk_size=4096)
        out.loss.backward()
        return out.loss.detach(), hidden.grad, weight.grad

    alone = run()
    monkeypatch.setattr(products.Products, "accumulate_batched", spy)
    monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: 2)
    batched = run()
    n = int((x["labels"] != -100).sum())
    assert calls and calls[0] == ((2, n, 4096), True), calls
    for got, expected in zip(batched, alone):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-3)
