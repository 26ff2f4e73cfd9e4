"""The per-token functions' eager schedule (``ops/linear/stored.py``): a trainable head keeps what its backward needs
from the forward, so the backward recomputes no tile.

- The outputs and every gradient equal the recompute schedule's, on every tile backend, with a bias, a softcap,
  masked tokens, and with the KL (through the log-probs alone, and through the KL too).
- The scaled store (forced as bf16 operands choose it on a GPU) within bf16's accuracy, in the weight gradient's
  memory as far as it goes, the chunks beyond the budget recomputed.
- GEMM work: 6 n D V forward + backward (8 for the recompute schedule), 8 with the KL's gradient (12).
- One backward only; forced where it cannot run, a clear error; ``auto`` on the CPU recomputes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dpo_kernels import linear_token_logprobs, linear_token_logprobs_and_kl
from dpo_kernels.ops.linear import plan, stored

from ..conftest import skip_if_unsupported
from .test_eager_schedule import _GemmCounter
from .test_scaled_store import _placed

V, D = 67, 12


def _data(dtype, seed=0, rows=3, T=9):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :2] = -100
    labels[1, 6:] = -100
    return dict(
        hidden=torch.randn(rows, T, D, generator=g, dtype=dtype),
        weight=torch.randn(V, D, generator=g, dtype=dtype) * 0.5,
        bias=torch.randn(V, generator=g, dtype=dtype) * 0.1,
        ref_hidden=torch.randn(rows, T, D, generator=g, dtype=dtype),
        ref_weight=torch.randn(V, D, generator=g, dtype=dtype) * 0.5,
        labels=labels,
        up=torch.randn(rows, T, generator=g, dtype=dtype),
        up_kl=torch.randn(rows, T, generator=g, dtype=dtype),
    )


def _run(d, schedule, *, kl: str | None = None, backend="torch", **options):
    """``(outputs, grads of hidden, weight, bias)``; ``kl``: None (log-probs only), "logp" (the KL function, a
    gradient through the log-probs alone) or "both"."""
    hidden, weight, bias = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    if kl is None:
        outs = (linear_token_logprobs(hidden, weight, d["labels"], bias=bias, backend=backend, schedule=schedule,
                                      **options),)
        total = (outs[0] * d["up"]).sum()
    else:
        outs = linear_token_logprobs_and_kl(hidden, weight, d["ref_hidden"], d["ref_weight"], d["labels"], bias=bias,
                                            backend=backend, schedule=schedule, **options)
        total = (outs[0] * d["up"]).sum() + ((outs[2] * d["up_kl"]).sum() if kl == "both" else 0)
    total.backward()
    return [o.detach() for o in outs], [hidden.grad, weight.grad, bias.grad]


@pytest.mark.parametrize("kl", [None, "logp", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_eager_schedule_equals_the_recompute_schedule(backend, dtype, kl):
    skip_if_unsupported(backend, dtype)
    d = _data(dtype)
    options = dict(softcap=3.0, vocab_chunk_size=16, token_chunk_size=8)
    got = _run(d, "eager", kl=kl, backend=backend, **options)
    expected = _run(d, "recompute", kl=kl, backend=backend, **options)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, e in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, e, **tol)


@pytest.fixture
def _scaled(monkeypatch):
    """The scaled store, as bf16 operands choose it on a GPU (the CPU's are fp32)."""
    monkeypatch.setattr(plan, "kept_store_dtype", lambda operands, sdt, opts: plan.SCALED_STORE_DTYPE)


@pytest.mark.parametrize("kl", [None, "both"])
@pytest.mark.parametrize("budget", [64.0, 1e-3], ids=["whole", "partial"])
def test_the_scaled_store_lies_in_the_weight_gradient_and_matches(backend, kl, budget, _scaled, caplog,
                                                                   monkeypatch):
    """The fp16 softmax weights (and the reference's, for the KL's gradient) in the weight gradient's memory as far
    as it goes, beside it within the budget; under a budget too small for the rest the chunks that do not fit are
    recomputed. About 50 kept tokens: 100 bytes a column of the store (200 with the reference's) against the fp32
    gradient's 48. Gradients within the fp16 weights' rounding of the recompute schedule's."""
    skip_if_unsupported(backend, torch.float32)
    d = _data(torch.float32, seed=1, rows=4, T=16)
    seen = _placed(monkeypatch)
    grads = []
    original_backward = stored.backward
    monkeypatch.setattr(stored, "backward", lambda *a: grads.append(a[3].dw.data_ptr()) or original_backward(*a))
    with caplog.at_level(logging.DEBUG, logger="dpo_kernels"):
        got = _run(d, "eager", kl=kl, backend=backend, vocab_chunk_size=8, eager_budget_mb=budget)
    expected = _run(d, "recompute", kl=kl, backend=backend, vocab_chunk_size=8)
    assert "the per-token eager schedule's scaled store" in caplog.text
    (chunks, placed), = seen
    gradient = range(grads[0], grads[0] + V * D * 4)
    in_gradient = [v0 for v0, pointers in placed.items() if all(p in gradient for p in pointers)]
    assert in_gradient and (len(placed) == len(chunks)) == (budget == 64.0), (placed, chunks)
    for a, e in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, e, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("kl", "schedule", "multiple"), [
    (None, "eager", 6), (None, "recompute", 8), (None, "auto", 8),
    ("both", "eager", 8), ("both", "recompute", 12), ("logp", "eager", 8), ("logp", "recompute", 10),
])
def test_gemm_flops_counted(kl, schedule, multiple):
    """``k n D V`` FLOPs forward + backward, ``n`` the kept tokens: the eager schedule's backward recomputes no tile
    (the KL function keeps the reference's side of its gradient too, so it never reads the reference again); on
    the CPU ``auto`` recomputes."""
    d = _data(torch.float32)
    n = int((d["labels"] != -100).sum())
    with _GemmCounter() as counter:
        _run(d, schedule, kl=kl)
    assert counter.flops == multiple * n * D * V


def test_one_backward_only_and_clear_errors(_scaled):
    d = _data(torch.float32)
    hidden, weight = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    logp = linear_token_logprobs(hidden, weight, d["labels"], backend="torch", schedule="eager")
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="schedule='recompute'"):
        logp.sum().backward()
    with pytest.raises(ValueError, match="schedule must be one of"):
        linear_token_logprobs(hidden, weight, d["labels"], schedule="fast")
    with pytest.raises(ValueError, match="eager_budget_mb must be a finite number > 0"):
        linear_token_logprobs(hidden, weight, d["labels"], schedule="eager", eager_budget_mb=0)
    with pytest.raises(ValueError, match="schedule='eager' cannot run here: backend='reference'"):
        linear_token_logprobs(hidden, weight, d["labels"], backend="reference", schedule="eager")


def test_fp32_tiles_must_fit_the_budget():
    """Without the scaled store the fp32 tiles are kept whole: a budget too small for them is refused by name."""
    d = _data(torch.float32)
    hidden, weight = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match="schedule='eager' cannot run here: .*eager_budget_mb"):
        linear_token_logprobs(hidden, weight, d["labels"], backend="torch", schedule="eager", eager_budget_mb=1e-4)


def test_a_frozen_head_forms_its_gradient_in_the_forward_under_every_schedule():
    d = _data(torch.float32)
    n = int((d["labels"] != -100).sum())
    for schedule in ("eager", "auto", "recompute"):
        hidden = d["hidden"].clone().requires_grad_()
        with _GemmCounter() as counter:
            linear_token_logprobs(hidden, d["weight"], d["labels"], backend="torch", schedule=schedule).sum().backward()
        assert counter.flops == 4 * n * D * V, schedule


def test_under_compile_a_forced_eager_schedule_says_why(monkeypatch):
    """The compiled op runs the recompute schedule; ``schedule="eager"`` there is refused by name (``auto`` takes
    the op)."""
    d = _data(torch.float32)
    hidden, weight = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="schedule='eager' cannot be used under torch.compile"):
        linear_token_logprobs(hidden, weight, d["labels"], backend="torch", schedule="eager")


@pytest.mark.parametrize("store", ["fp32 tiles", "scaled"])
def test_fp32_master_weights_under_bf16_autocast(backend, store, monkeypatch):
    """What training hands the head (TRL's default config): fp32 weights and hidden states under bf16 autocast.
    The eager schedule (fp32 tiles, or the scaled store forced as a GPU's bf16 operands choose it) gives the
    recompute schedule's log-probs, KL and fp32 gradients (to the scaled store's fp16 rounding)."""
    skip_if_unsupported(backend, torch.bfloat16)
    if store == "scaled":
        monkeypatch.setattr(plan, "kept_store_dtype", lambda operands, sdt, opts: plan.SCALED_STORE_DTYPE)
    d = _data(torch.float32, seed=2)
    results = {}
    for schedule in ("eager", "recompute"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[schedule] = _run(d, schedule, kl="both", backend=backend, vocab_chunk_size=16)
    got, expected = results["eager"], results["recompute"]
    assert all(g.dtype == torch.float32 for g in got[1])
    tol = dict(rtol=1e-5, atol=1e-6) if store == "fp32 tiles" else dict(rtol=2e-3, atol=2e-3)
    for a, e in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("kl", [None, "both"])
def test_hidden_states_made_for_the_call_are_not_held_until_the_backward(kl, _scaled):
    """A caller that gathers the kept tokens' hidden states for the call (TRL's flow under ``patch()``: fp32 under
    autocast, 54 MiB at the Gemma-2 head) does not find them held by the per-token eager schedule, whose backward
    reads its own converted copy of the kept rows (the autograd node saves no hidden states); the recompute schedule
    saves them, as does the eager one where its copy is the caller's memory. Gradients as the recompute
    schedule's."""
    d = _data(torch.float32, seed=1, rows=4, T=16)
    results = {}
    for schedule in ("eager", "recompute"):
        full = d["hidden"].clone().requires_grad_()
        weight = d["weight"].clone().requires_grad_()
        gathered = full[:, 2:].clone()  # the caller's copy; the call copies the kept rows again (some are -100)
        args = (gathered, weight) if kl is None else (gathered, weight, d["ref_hidden"][:, 2:], d["ref_weight"])
        fn = linear_token_logprobs if kl is None else linear_token_logprobs_and_kl
        outs = fn(*args, d["labels"][:, 2:], schedule=schedule, backend="torch", vocab_chunk_size=8)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert (_saved_hidden(outs[0]) is None) == (schedule == "eager"), schedule
        total = (outs[0] * d["up"][:, 2:]).sum() + (0 if kl is None else (outs[2] * d["up_kl"][:, 2:]).sum())
        total.backward()
        results[schedule] = (full.grad, weight.grad)
    for got, expected in zip(results["eager"], results["recompute"], strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    # nothing dropped or converted: the kept rows are the caller's memory, saved (no cost) for autograd's checks
    labels = d["labels"].clone()
    labels[labels == -100] = 0
    hidden = d["hidden"].clone().requires_grad_()
    out = linear_token_logprobs(hidden, d["weight"].clone().requires_grad_(), labels, schedule="eager",
                                backend="torch")
    assert _saved_hidden(out).data_ptr() == hidden.data_ptr()


@pytest.mark.parametrize("kl", [None, "both"])
def test_a_frozen_head_saves_no_hidden_states(kl):
    """A frozen head (LoRA) forms the hidden states' gradient in its forward, so its backward reads neither the
    hidden states nor the head: the autograd node saves no hidden states (a caller's gathered copy, or a model's
    last activation nothing else keeps, is freed after the forward). Gradients as the reference's."""
    d = _data(torch.float32, seed=1, rows=4, T=16)
    grads = []
    for backend in ("torch", "reference"):
        hidden = d["hidden"].clone().requires_grad_()
        if kl is None:
            outs = (linear_token_logprobs(hidden, d["weight"], d["labels"], bias=d["bias"], backend=backend),)
        else:
            outs = linear_token_logprobs_and_kl(hidden, d["weight"], d["ref_hidden"], d["ref_weight"], d["labels"],
                                                bias=d["bias"], backend=backend)
        if backend == "torch":
            assert _saved_hidden(outs[0]) is None
        total = (outs[0] * d["up"]).sum() + (0 if kl is None else (outs[2] * d["up_kl"]).sum())
        total.backward()
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def _saved_hidden(out: torch.Tensor):
    """The hidden states the per-token function's autograd node saved (``None``: none)."""
    node = out.grad_fn
    while type(node).__name__ != "_LoopStatsBackward":
        node = node.next_functions[0][0]
    return node.saved_tensors[0]
