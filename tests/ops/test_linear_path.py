"""The one linear-path design (``dpo_kernels/ops/linear``): what it promises beyond matching the oracle.

- The statistics trainers log come out of the same forward pass, equal to the full-logits oracle.
- When the KL output gets no gradient, the backward never reads the reference (NaN reference inputs stay harmless).
- Ignored tokens never reach a GEMM.
- The GPU product policy: with half inputs every GEMM takes half operands and writes fp32, and no fp32 ``[V, D]``
  tensor is ever allocated. The CPU has no half-into-fp32 GEMM, so the test runs the driver on CPU tensors under a
  dispatch mode that records every op and computes the ``out_dtype`` GEMMs it intercepts (exactly, in fp64).
- Tile sizes come from one memory budget.
- Each backend's tile kernels agree with the PyTorch ones, including half gradient tiles, biases and logging rows.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_kernels import linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs_and_kl
from dpo_kernels.ops import registry
from dpo_kernels.ops.common import LinearHead
from dpo_kernels.ops.linear import contract, plan, products
from dpo_kernels.ops.linear.contract import LogitsTile
from dpo_kernels.options import TokenOptions
from dpo_kernels.ops.dispatch import linear_stats

from ..conftest import assert_close, backends_under_test

aten = torch.ops.aten


def run_linear_token_stats(*args, **kwargs):
    """``(logp, logged)`` of the dispatch's linear path (the statistics trainers log beside the log-probs)."""
    out = linear_stats(*args, **kwargs)
    return out.logp, out.logged



def _head(seed=0, rows=3, seq=7, d=12, v=300, dtype=torch.float32, mask=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (rows, seq), generator=g)
    if mask:
        labels[0, :3] = -100
        labels[-1, -2:] = -100
    hidden = torch.randn(rows, seq, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.3).to(dtype)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("frozen", [False, True], ids=["no_gradient", "frozen_head"])
@pytest.mark.parametrize("tiles", [{}, {"token_chunk_size": 4, "vocab_chunk_size": 37}], ids=["one_tile", "small"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_logged_statistics_match_the_oracle(backend, tiles, frozen):
    """Also with a frozen head whose hidden states need a gradient (TRL's entropy logging under PEFT): its forward
    folds through ``fold_weights``, which the C++ and CUDA kernels once ran without the logging rows (a refusal)."""
    hidden, weight, bias, labels = _head()
    opts = TokenOptions(softcap=3.0, logit_scale=1.3, temperature=0.7, **tiles)
    leaf = hidden.clone().requires_grad_(frozen)
    expected_logp, expected = run_linear_token_stats(LinearHead(leaf, weight, bias), None, labels, opts, "reference",
                                                     logging=True)
    mine = hidden.clone().requires_grad_(frozen)
    logp, logged = run_linear_token_stats(LinearHead(mine, weight, bias), None, labels, opts, backend, logging=True)
    assert_close(logp, expected_logp, torch.float32, "log-probs beside the logged statistics")
    if frozen:
        upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(5)) * (labels != -100)
        (expected_grad,) = torch.autograd.grad((expected_logp * upstream).sum(), leaf)
        (grad,) = torch.autograd.grad((logp * upstream).sum(), mine)
        assert_close(grad, expected_grad, torch.float32, "a frozen head's hidden gradient beside the logging")
    assert set(logged) == {"entropy", "log_sum_sq_probs", "mean_logits", "is_top1"}
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(logged[name], expected[name], torch.float32, name)
    assert torch.equal(logged["is_top1"], expected["is_top1"])


def test_is_top1_means_the_first_argmax():
    """A tie with an earlier column is not a top-1 prediction; a tie with a later one is (argmax is the first)."""
    weight = torch.tensor([[1.0], [2.0], [2.0], [0.5]])
    hidden = torch.ones(1, 2, 1)
    labels = torch.tensor([[1, 2]])
    for backend in backends_under_test():
        _, logged = run_linear_token_stats(LinearHead(hidden, weight), None, labels,
                                           TokenOptions(vocab_chunk_size=2), backend, logging=True)
        assert logged["is_top1"].tolist() == [[True, False]], backend


@pytest.mark.parametrize("backend", backends_under_test())
def test_kl_without_gradient_never_reads_the_reference(backend):
    """NaN reference inputs: the KL is NaN, but a backward through the log-probs alone must not touch them."""
    hidden, weight, _, labels = _head()
    nan_hidden = torch.full_like(hidden, float("nan"))
    nan_weight = torch.full_like(weight, float("nan"))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _, kl = linear_token_logprobs_and_kl(h, w, nan_hidden, nan_weight, labels, backend=backend)
    assert torch.isnan(kl[labels != -100]).all()
    logp.sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_token_logprobs(h2, w2, labels, backend=backend).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert_close(h.grad, h2.grad, torch.float32, "dH without the KL")
    assert_close(w.grad, w2.grad, torch.float32, "dW without the KL")

    logits = (hidden @ weight.T).requires_grad_()
    logp, _, _ = token_logprobs_and_kl(logits, torch.full_like(logits, float("nan")), labels, backend=backend)
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all()


class _Recorder(TorchDispatchMode):
    """Records every op's name, input dtypes and output tensors; optionally emulates the ``out_dtype`` GEMMs the
    CPU lacks (half operands, fp32 result, computed exactly in fp64 and rounded once to fp32)."""

    EMULATED = {aten.mm.dtype, aten.mm.dtype_out, aten.addmm.dtype, aten.addmm.dtype_out}

    def __init__(self, emulate: bool = False):
        super().__init__()
        self.emulate, self.gemms, self.outputs = emulate, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default,
                    *self.EMULATED):
            mats = [a for a in args if isinstance(a, torch.Tensor)][-2:] if "addmm" in str(func) else args[:2]
            self.gemms.append((str(func), tuple(m.dtype for m in mats), tuple(m.shape for m in mats)))
        if self.emulate and func in self.EMULATED:
            out = self._emulate(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out

    @staticmethod
    def _emulate(func, args, kwargs):
        if func in (aten.mm.dtype, aten.mm.dtype_out):
            a, b, out_dtype = args[:3]
            result = (a.double() @ b.double()).to(out_dtype)
        else:
            acc, a, b, out_dtype = args[:4]
            result = (acc.double() + a.double() @ b.double()).to(out_dtype)
        if "out" in kwargs:
            return kwargs["out"].copy_(result)
        return result


@pytest.fixture
def gpu_product_policy(monkeypatch):
    """The product policy a CUDA device gets (half operands, fp32 GEMM output) on CPU tensors."""
    monkeypatch.setattr(products, "half_into_float", lambda device_type, dtype: True)
    monkeypatch.setattr(products, "accumulates_into_float", lambda device_type, dtype: True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
def test_gpu_policy_half_operands_and_no_fp32_vocab_by_hidden_buffer(gpu_product_policy, dtype, with_kl):
    hidden, weight, _, labels = _head(v=1000, d=16, dtype=dtype)
    vocab, dim = weight.shape
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = LinearHead(hidden.flip(0), weight) if with_kl else None
    opts = TokenOptions(vocab_chunk_size=256)  # several vocabulary chunks
    with _Recorder(emulate=True) as rec:
        outs = linear_stats(LinearHead(h, w), ref, labels, opts, "torch").public()
        logp, kl = (outs, None) if ref is None else (outs[0], outs[2])
        (logp.sum() + (kl.sum() if kl is not None else 0)).backward()
    assert rec.gemms, "no GEMM was recorded"
    for name, operand_dtypes, _ in rec.gemms:
        assert operand_dtypes == (dtype, dtype), f"{name} took {operand_dtypes}, not half operands"
        assert ".dtype" in name or operand_dtypes[0] == w.dtype, name
    fp32_vd = [(n, dt, k) for n, dt, k in rec.outputs if dt == torch.float32 and k >= vocab * dim]
    assert not fp32_vd, f"an fp32 tensor of V x D entries or more was allocated: {fp32_vd[:3]}"
    assert w.grad.dtype == dtype and h.grad.dtype == dtype
    # and the values: against the float64 oracle on the same half operands
    expected = linear_token_logprobs(hidden.double().requires_grad_(), weight.double(), labels, backend="reference")
    assert_close(logp, expected, dtype, "log-probs through the GPU product policy")


@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b in ("torch", "triton")])
@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
def test_gpu_policy_frozen_head_weights_are_half_operands(gpu_product_policy, backend, with_kl):
    """Issue 29: a frozen head's softmax weights go to their GEMM as half operands (the fused fold_weights writes
    them in bf16 on Triton; PyTorch ops round them once elsewhere), against the float64 oracle."""
    hidden, weight, _, labels = _head(v=1000, d=16, dtype=torch.bfloat16)
    h = hidden.clone().requires_grad_()
    ref = LinearHead(hidden.flip(0), weight) if with_kl else None
    opts = TokenOptions(vocab_chunk_size=256, softcap=20.0)
    with _Recorder(emulate=True) as rec:
        out = linear_stats(LinearHead(h, weight), ref, labels, opts, backend)
        (out.logp.sum() + (out.kl.sum() if with_kl else 0)).backward()
    assert rec.gemms and all(dtypes == (torch.bfloat16, torch.bfloat16) for _, dtypes, _ in rec.gemms), rec.gemms
    h64 = hidden.double().requires_grad_()
    expected = linear_stats(LinearHead(h64, weight.double()),
                            None if ref is None else LinearHead(ref.hidden.double(), weight.double()), labels, opts,
                            "reference")
    (expected.logp.sum() + (expected.kl.sum() if with_kl else 0)).backward()
    assert_close(out.logp, expected.logp, torch.bfloat16, "log-probs")
    assert_close(h.grad, h64.grad, torch.bfloat16, "hidden gradient of a frozen head")


def test_ignored_tokens_never_reach_a_gemm():
    hidden, weight, _, labels = _head(rows=4, seq=9)
    kept = int((labels != -100).sum())
    assert kept < labels.numel()
    for backend in backends_under_test():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with _Recorder() as rec:
            linear_token_logprobs(h, w, labels, backend=backend, vocab_chunk_size=128).sum().backward()
        forward = [shapes for name, _, shapes in rec.gemms if shapes[1][0] == hidden.shape[-1]]  # [n, D] x [D, vc]
        assert forward and all(shapes[0][0] == kept for shapes in forward), (backend, forward)
        assert (h.grad[labels == -100] == 0).all()


def test_tile_plan_from_the_budget():
    opts = TokenOptions(tile_budget_mb=1.0)
    entries = 2**20 // 6
    p = plan.plan_tiles(100, 128256, 6, opts, torch.device("cuda"))
    assert p.tokens == 100 and p.vocab == entries // 100 - (entries // 100) % plan.VOCAB_ALIGN
    # too many tokens for a full-height tile of MIN_VOCAB_CHUNK columns: token blocks
    p = plan.plan_tiles(10**5, 128256, 6, opts, torch.device("cuda"))
    assert p.tokens == entries // plan.MIN_VOCAB_CHUNK and p.vocab == plan.MIN_VOCAB_CHUNK
    assert not p.single_token_block(10**5)
    # explicit sizes win; a small vocabulary is one chunk
    p = plan.plan_tiles(50, 1000, 6, TokenOptions(token_chunk_size=7, vocab_chunk_size=33), torch.device("cpu"))
    assert (p.tokens, p.vocab) == (7, 33)
    assert plan.plan_tiles(50, 1000, 4, TokenOptions(), torch.device("cpu")).vocab == 1000
    assert plan.default_tile_budget_mb(torch.device("cpu")) < plan.default_tile_budget_mb(torch.device("cuda"))


def test_tile_budget_mb_is_validated():
    with pytest.raises(ValueError, match="tile_budget_mb must be None or a finite number of MiB > 0"):
        TokenOptions(tile_budget_mb=0)
    hidden, weight, _, labels = _head()
    with pytest.raises(ValueError, match="tile_budget_mb"):
        linear_token_logprobs(hidden, weight, labels, tile_budget_mb=-1.0)


def test_token_blocks_accumulate_the_weight_gradient_like_one_block():
    """Several token blocks (an fp32 [vc, D] buffer per chunk) give the gradients of one block (direct writes)."""
    hidden, weight, bias, labels = _head(rows=4, seq=16, v=500)
    grads = []
    for tokens in (None, 5):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        linear_token_logprobs(h, w, labels, bias=b, backend="torch", token_chunk_size=tokens).sum().backward()
        grads.append((h.grad, w.grad, b.grad))
    for (a, b_), name in zip(zip(*grads, strict=True), ("dH", "dW", "db"), strict=True):
        assert_close(a, b_, torch.float32, name)


def _tile_inputs(seed, n=6, width=45, v0=40, vocab=200, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[:2] = v0 + torch.tensor([0, width - 1])  # labels on the tile's edges
    labels[2] = v0 - 1  # just left of the tile

    def tile():
        return LogitsTile((torch.randn(n, width, generator=g) * 3).to(dtype),
                          (torch.randn(width, generator=g) * 0.2).to(dtype), v0, labels)

    return tile(), tile(), labels


def _tile_backends() -> list[str]:
    return [b for b in backends_under_test() if b != "torch"]


@pytest.mark.parametrize("logging", [False, True], ids=["stats", "logging"])
@pytest.mark.parametrize("backend", _tile_backends())
def test_fold_kernel_agrees_with_the_torch_kernel(backend, logging):
    kernels = importlib.import_module(registry._BACKENDS[backend].module).KERNELS.tiles
    torch_kernels = importlib.import_module("dpo_kernels.ops.torch_chunked").KERNELS.tiles
    tile, ref_tile, _ = _tile_inputs(0)
    opts = TokenOptions(softcap=4.0, temperature=0.9)
    results = []
    for k in (torch_kernels, kernels):
        stats = contract.new_stats(tile.labels.numel(), torch.float32, torch.device("cpu"), logging=logging)
        ref_stats = contract.new_ref_stats(tile.labels.numel(), torch.float32, torch.device("cpu"))
        for _ in range(2):  # a second tile folded onto the first exercises the merge
            k.fold(tile, stats, ref_tile, ref_stats, opts)
        results.append((stats, ref_stats))
    (s0, r0), (s1, r1) = results
    assert_close(s1[torch.isfinite(s0)], s0[torch.isfinite(s0)], torch.float32, "policy statistics")
    assert torch.equal(torch.isfinite(s0), torch.isfinite(s1))
    assert_close(r1, r0, torch.float32, "reference statistics")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("backend", _tile_backends())
def test_grad_kernel_agrees_with_the_torch_kernel(backend, with_kl, out_dtype):
    kernels = importlib.import_module(registry._BACKENDS[backend].module).KERNELS.tiles
    torch_kernels = importlib.import_module("dpo_kernels.ops.torch_chunked").KERNELS.tiles
    tile, ref_tile, labels = _tile_inputs(1)
    n = labels.numel()
    g = torch.Generator().manual_seed(2)
    lse, ref_lse = torch.randn(n, generator=g) + 5, torch.randn(n, generator=g) + 5
    up, up_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    opts = TokenOptions(softcap=4.0, logit_scale=1.2)
    outs = []
    for k in (torch_kernels, kernels):
        out = torch.empty(tile.logits.shape, dtype=out_dtype)
        kept = k.grad(tile, lse, up, ref_tile if with_kl else None, ref_lse if with_kl else None,
                      up_kl if with_kl else None, opts, out)
        assert kept is True
        outs.append(out)
    assert_close(outs[1].float(), outs[0].float(), out_dtype, f"dZ in {out_dtype}")


def test_without_a_kl_the_reference_is_folded_alone_in_the_policys_scratch(backend):
    """A loss that wants no KL (every one but TDPO's) gets the reference's max, sum and label logit from a fold of
    each reference tile alone, computed into the policy's scratch before the policy's tile: one fp32 tile fewer (at
    the Gemma-2 head, 6144 kept tokens, 132 MiB). The statistics equal the joint fold's, on every tile backend; no KL
    comes out; the tile budget counts one tile, so the chunks are twice as wide within it."""
    from dpo_kernels.ops.linear.kept import KeptTokens
    from dpo_kernels.ops.linear.loop import bytes_per_entry, finish_forward, fold_all, tile_plan
    from dpo_kernels.ops.linear.sources import GemmSource

    g = torch.Generator().manual_seed(5)
    n, d, v = 40, 16, 700
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    heads = [LinearHead(torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.7,
                        torch.randn(v, generator=g) * 0.1) for _ in range(2)]
    opts = TokenOptions(softcap=20.0, vocab_chunk_size=128)
    kernels = registry.backend_kernels(backend, "test", heads[0].hidden).tiles
    prods = products.Products.in_dtype(torch.float32, "cpu", torch.float32)
    cpu = torch.device("cpu")
    results = {}
    for with_kl in (True, False):
        rows = KeptTokens(labels, -100, 0)
        policy, ref = (GemmSource.of(h, rows, prods) for h in heads)
        stats, ref_stats = fold_all(rows, policy, ref, opts, kernels, False, cpu, with_kl=with_kl)
        assert (policy._scratch is ref._scratch) is not with_kl
        out, lse, ref_lse = finish_forward(stats, ref_stats, rows, labels.shape, None, v, False, with_kl=with_kl)
        assert (out.kl is None) is not with_kl
        results[with_kl] = (stats, ref_stats[:3], out.logp, out.ref_logp, lse, ref_lse)
        assert {w: bytes_per_entry(policy, ref, cpu, shared=not w) for w in (True, False)} == {True: 8, False: 4}
        budget = TokenOptions(tile_budget_mb=rows.n * 256 * 8 / 2**20)  # one 256-column pair of fp32 tiles
        joint, alone = (tile_plan(rows, policy, ref, budget, cpu, with_kl=w) for w in (True, False))
        bound = budget.tile_budget_mb * 2**20
        assert joint.tokens * joint.vocab * 8 <= bound and alone.tokens * alone.vocab * 4 <= bound
        assert alone.tokens * alone.vocab > 1.5 * joint.tokens * joint.vocab
    for joint, alone in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(alone, joint, rtol=1e-6, atol=1e-6, equal_nan=True)
