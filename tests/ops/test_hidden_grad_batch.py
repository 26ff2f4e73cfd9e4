"""The backward's ``dH`` products of several vocabulary chunks as one batched GEMM (issue 29: the Gemma-2 head's
``[n, D]`` output fills its last wave badly, ``dpo_kernels.ops.linear.plan.hidden_grad_batch``).

Only an accelerator batches (the decision is about GPU waves), so these tests force the plan's batch on the CPU, as
``test_scaled_store`` forces the scaled store, and check the decision itself apart: every gradient as the oracle's and
as one chunk at a time's, the batched GEMMs issued for the chunks that may join a run and no others."""

from __future__ import annotations

import pytest
import torch

from dpo_kernels.ops.linear import plan, products
from dpo_kernels.ops.linear.loop import chunk_runs
from dpo_kernels.ops.linear.products import Products
from dpo_kernels.options import TokenOptions

from ..conftest import skip_if_unsupported
from .test_eager_schedule import _compare, _data, _GemmCounter, _run
from .test_scaled_store import _beside_grad_mb


@pytest.fixture
def scaled_store(monkeypatch):
    """The scaled store, as bf16 operands choose it on a GPU (the CPU's are fp32)."""
    monkeypatch.setattr(plan, "kept_store_dtype", lambda operands, sdt, opts: plan.SCALED_STORE_DTYPE)


def test_the_batch_is_taken_where_the_hidden_gradient_fills_its_waves_badly():
    meta, cpu = torch.device("meta"), torch.device("cpu")  # meta is planned as an H100's 132 multiprocessors
    # Gemma-2 head, 6144 kept tokens: 48 x 9 tiles of 128 x 256 are 3.3 waves run as 4; two outputs 6.5 of 7
    assert plan.wave_fill(6144, 2304, 132) == pytest.approx(432 / 528)
    assert plan.wave_fill(6144, 2304, 132, batch=2) == pytest.approx(864 / 924)
    assert plan.hidden_grad_batch(6144, 2304, meta) == 2
    # Llama-3 head: 768 tiles, 5.8 waves of 6 either way
    assert plan.hidden_grad_batch(6144, 4096, meta) == 1
    assert plan.hidden_grad_batch(6144, 2304, cpu) == 1  # no waves to fill
    opts = TokenOptions()
    one_block = plan.TilePlan(tokens=6144, vocab=5632, balanced_tokens=True, balanced_vocab=False)
    assert plan.plan_stored_backward(one_block, 6144, 2, opts, meta, dim=2304).hidden_grad_batch == 2
    assert plan.plan_stored_backward(one_block, 6144, 2, opts, meta, dim=4096).hidden_grad_batch == 1
    blocks = plan.TilePlan(tokens=3072, vocab=5632, balanced_tokens=False)  # two token blocks: no batch
    assert plan.plan_stored_backward(blocks, 6144, 2, opts, meta, dim=2304).hidden_grad_batch == 1


class _Chunks:
    def __init__(self, batchable):
        self.batchable = lambda v0: v0 in batchable


def test_runs_are_consecutive_batchable_chunks_of_one_width():
    chunks = [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 45)]
    every = _Chunks({0, 8, 16, 24, 32, 40})
    assert list(chunk_runs(chunks, 2, every)) == [[(0, 8), (8, 16)], [(16, 24), (24, 32)], [(32, 40)], [(40, 45)]]
    assert list(chunk_runs(chunks, 3, every)) == [[(0, 8), (8, 16), (16, 24)], [(24, 32)], [(32, 40)], [(40, 45)]]
    assert list(chunk_runs(chunks, 1, every)) == [[c] for c in chunks]
    some = _Chunks({0, 16, 24, 32})  # 8 is not batchable: 0 goes alone, 16 and 24 pair
    assert list(chunk_runs(chunks, 2, some)) == [[(0, 8)], [(8, 16)], [(16, 24), (24, 32)], [(32, 40)], [(40, 45)]]
    widths = _Chunks({0, 8, 12})  # a run is of one width: 0 alone, then 8 and 12
    assert list(chunk_runs([(0, 8), (8, 12), (12, 16)], 2, widths)) == [[(0, 8)], [(8, 12), (12, 16)]]


def test_batched_accumulation_adds_each_product_to_its_own_partial():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(2, 5, 3, generator=g)
    a, b = torch.randn(2, 5, 4, generator=g), torch.randn(2, 4, 3, generator=g)
    expected = acc + a @ b
    p = Products.in_dtype(torch.float32, "cpu", torch.float32)
    assert p.batches("cpu")
    p.accumulate_batched(acc, a, b)
    torch.testing.assert_close(acc, expected)
    # half operands into fp32: the CPU widens them instead (no batched fp32-output GEMM there), quietly
    assert not products.batches_into_float("cpu", torch.bfloat16)


def _spy(monkeypatch):
    calls = []
    original = Products.accumulate_batched

    def spy(self, acc, a, b, fresh=False):
        calls.append((tuple(a.shape), fresh))
        return original(self, acc, a, b, fresh=fresh)

    monkeypatch.setattr(Products, "accumulate_batched", spy)
    return calls


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("case", ["whole store", "part of the vocabulary", "tdpo2", "bf16 head", "rows kept"])
def test_batched_hidden_gradients_match_the_oracle_and_one_chunk_at_a_time(backend, batch, case, scaled_store,
                                                                            monkeypatch):
    """67 columns in chunks of 16: four of 16 and one of 3. With the whole store kept, batches of 2 make two runs
    (the last chunk alone), of 3 one run; with half of what the store needs beside the gradient the recomputed
    chunks go alone; TDPO2 keeps the reference's weights too; a bf16 head (widened on the CPU, so converted) takes
    each run's rows in one conversion; where the first chunks' converted rows are kept in the gradient's memory
    those go alone and a later run adds to what they accumulated."""
    dtype = torch.bfloat16 if case in ("bf16 head", "rows kept") else torch.float32
    skip_if_unsupported(backend, dtype)
    d = _data(torch.float32, bias=dtype == torch.float32)
    if case == "rows kept":  # as test_scaled_store's: the first chunks' converted rows kept, those chunks alone
        g = torch.Generator().manual_seed(1)
        d["labels"][:, 4:] = -100
        for name in ("policy_hidden", "ref_hidden"):
            d[name] = torch.randn(*d[name].shape[:2], 64, generator=g)
        for name in ("lm_head_weight", "ref_lm_head_weight"):
            d[name] = torch.randn(d[name].shape[0], 64, generator=g) * 0.2
    if dtype != torch.float32:
        d = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in d.items()}
    options = dict(loss_type="tdpo2" if case == "tdpo2" else "sigmoid", beta=0.2, softcap=4.0,
                   vocab_chunk_size=16, backend=backend)
    if case == "part of the vocabulary":
        n = int((d["labels"] != -100).sum())
        options.update(eager_budget_mb=_beside_grad_mb(n, 1, d["lm_head_weight"].shape[1], 4) / 2)
    one_at_a_time = _run(d, schedule="eager", **options)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: batch)
    got = _run(d, schedule="eager", **options)
    n, width = int((d["labels"] != -100).sum()), 16
    run = (batch, n, width)
    if case == "part of the vocabulary":  # the first kept chunks pair; not three of them
        assert calls == ([(run, True)] if batch == 2 else []), calls
    elif case == "rows kept":  # the first chunks alone (their rows kept), then runs that add to what they formed
        assert calls and calls == [(run, False)] * len(calls), calls
    else:  # the first run writes the partials
        assert calls == [(run, True)] + [(run, False)] * (4 // batch - 1), calls
    tol = 2e-2 if dtype != torch.float32 else 1e-5  # fp32: only the order of dH's sum differs
    _compare(got, one_at_a_time, tol)
    _compare(_run(d, schedule="eager", **options), _run(d, **{**options, "backend": "reference"}),
             2e-2 if dtype != torch.float32 else 2e-3)


def test_batched_runs_issue_the_same_gemm_work(scaled_store, monkeypatch):
    """The batch changes how many launches the dH products take, not their FLOPs: 8 n D V for sigmoid DPO."""
    d = _data(torch.float32, bias=False)
    n, dim, vocab = int((d["labels"] != -100).sum()), d["policy_hidden"].shape[-1], d["lm_head_weight"].shape[0]
    calls = _spy(monkeypatch)
    monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: 2)
    with _GemmCounter() as counter:
        _run(d, schedule="eager", backend="torch", vocab_chunk_size=16)
    assert calls
    assert counter.flops == 8 * n * dim * vocab


@pytest.mark.parametrize("kl", [None, "both"])
def test_the_per_token_functions_batch_their_hidden_gradients_too(backend, kl, scaled_store, monkeypatch):
    """The per-token functions' eager schedule shares the backward (``linear_token_logprobs`` and the KL function
    over a scaled store): 67 columns in chunks of 8 make four runs of two, and the last chunk (3 columns) alone."""
    from . import test_stored_primitives as per_token

    skip_if_unsupported(backend, torch.float32)
    d = per_token._data(torch.float32, seed=1, rows=4, T=16)
    options = dict(kl=kl, backend=backend, vocab_chunk_size=8, eager_budget_mb=64.0)
    one_at_a_time = per_token._run(d, "eager", **options)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: 2)
    got = per_token._run(d, "eager", **options)
    n = int((d["labels"] != -100).sum())
    assert calls == [((2, n, 8), True)] + [((2, n, 8), False)] * 3, calls
    for a, e in zip(got[0] + got[1], one_at_a_time[0] + one_at_a_time[1], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_without_a_batched_fp32_accumulation_each_chunk_goes_alone(scaled_store, monkeypatch):
    """Where the device has no ``baddbmm(out_dtype=float32)`` for the operands (older torch), the probe only logs,
    and the backward runs one chunk at a time with the same gradients."""
    products.batches_into_float.cache_clear()
    try:
        def unsupported(*args, **kwargs):
            raise NotImplementedError("Could not run 'aten::baddbmm.dtype_out' with arguments from the 'Meta' backend")

        monkeypatch.setattr(torch, "baddbmm", unsupported)
        assert not products.batches_into_float("meta", torch.bfloat16)
    finally:
        products.batches_into_float.cache_clear()
    d = _data(torch.float32, bias=False)
    expected = _run(d, schedule="eager", backend="torch", vocab_chunk_size=16)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: 2)
    monkeypatch.setattr(Products, "batches", lambda self, device_type: False)
    _compare(_run(d, schedule="eager", backend="torch", vocab_chunk_size=16), expected, 1e-6)
    assert calls == []


def test_fp32_master_weights_under_bf16_autocast(backend, scaled_store, monkeypatch):
    """TRL's default: fp32 master weights under bf16 autocast, each run's head rows rounded to bf16 in one conversion
    (on the CPU then widened back, as its GEMMs take fp32). Batched against one chunk at a time (the same rounded
    operands: only dH's sum order differs) and against the recompute schedule under the same autocast."""
    skip_if_unsupported(backend, torch.float32)
    d = _data(torch.float32, bias=False)
    options = dict(backend=backend, vocab_chunk_size=16)
    converted = []
    original = Products.operand

    def spy(self, t):
        converted.append(tuple(t.shape))
        return original(self, t)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        recompute = _run(d, schedule="recompute", **options)
        one_at_a_time = _run(d, schedule="eager", **options)
        calls = _spy(monkeypatch)
        monkeypatch.setattr(plan, "hidden_grad_batch", lambda tokens, dim, device: 2)
        monkeypatch.setattr(Products, "operand", spy)
        got = _run(d, schedule="eager", **options)
    n, dim = int((d["labels"] != -100).sum()), d["lm_head_weight"].shape[1]
    assert calls == [((2, n, 16), True), ((2, n, 16), False)], calls
    assert (32, dim) in converted, "a run's rows were not converted in one piece"
    _compare((got[0], list(got[1])), one_at_a_time, 1e-5)  # (_compare consumes the gradient lists)
    _compare(got, recompute, 2e-2)
