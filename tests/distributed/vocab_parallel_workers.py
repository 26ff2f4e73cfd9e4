"""What each rank of ``test_vocab_parallel.py`` runs: vocabulary-parallel calls on this rank's slice, checked against
the same backend on the whole vocabulary in this process (every rank builds the same inputs from one seed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

UNEVEN = {2: [40, 61], 4: [10, 30, 25, 36]}  # slice sizes in rank order: uneven on purpose
D = 12
TOL = 1e-6  # fp32: the combine changes only the order of the sums


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: not finite"
    err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _inputs(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (4, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[-1] = -100  # a fully masked row
    labels[1, 0] = vocab - 1  # the last column (the last rank's)
    return {
        "labels": labels,
        "hidden": torch.randn(4, 7, D, generator=g),
        "weight": torch.randn(vocab, D, generator=g) / D**0.5,
        "bias": torch.randn(vocab, generator=g) * 0.3,
        "ref_hidden": torch.randn(4, 7, D + 2, generator=g),
        "ref_weight": torch.randn(vocab, D + 2, generator=g) / D**0.5,
        "logits": torch.randn(4, 7, vocab, generator=g) * 3,
        "ref_logits": torch.randn(4, 7, vocab, generator=g) * 3,
        "upstream": [torch.randn(4, 7, generator=g) for _ in range(3)],
    }


def _grads(outs, leaves: list[torch.Tensor], upstream) -> list[torch.Tensor]:
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, u) for o, u in zip(outs, upstream, strict=False) if o.requires_grad]
    return list(torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs]))


def vocab_parallel_checks(rank: int, world: int, backends: list[str]) -> None:
    import dpo_kernels

    sizes = UNEVEN[world]
    vocab, start = sum(sizes), sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    x = _inputs(vocab)
    group = dist.group.WORLD
    opts = dict(softcap=20.0, temperature=0.9)
    for backend in backends:
        # from hidden states, with a bias and a reference head
        h = x["hidden"].clone().requires_grad_()
        w_full, b_full = x["weight"].clone().requires_grad_(), x["bias"].clone().requires_grad_()
        full = dpo_kernels.linear_token_logprobs_and_kl(h, w_full, x["ref_hidden"], x["ref_weight"], x["labels"],
                                                        bias=b_full, backend=backend, vocab_chunk_size=16, **opts)
        full_grads = _grads(full, [h, w_full, b_full], x["upstream"])
        for schedule in ("recompute", "eager"):  # eager: each rank's slice keeps its tiles for its backward
            h2 = x["hidden"].clone().requires_grad_()
            w, b = x["weight"][mine].clone().requires_grad_(), x["bias"][mine].clone().requires_grad_()
            vp = dpo_kernels.linear_token_logprobs_and_kl(h2, w, x["ref_hidden"], x["ref_weight"][mine], x["labels"],
                                                          bias=b, backend=backend, vocab_chunk_size=16,
                                                          vocab_parallel_group=group, schedule=schedule, **opts)
            grads = _grads(vp, [h2, w, b], x["upstream"])
            for name, a, e in zip(("logp", "ref_logp", "kl"), vp, full, strict=True):
                _check(a, e, f"{backend} {schedule} linear {name}")
            _check(grads[0], full_grads[0], f"{backend} {schedule} dH (summed over the group)")
            _check(grads[1], full_grads[1][mine], f"{backend} {schedule} dW slice")
            _check(grads[2], full_grads[2][mine], f"{backend} {schedule} db slice")

        # a frozen head (issue 29): the hidden states' gradient formed in the forward from partial accumulators,
        # brought to the global maxima and summed over the group, the label's row from the rank holding it
        h3 = x["hidden"].clone().requires_grad_()
        frozen = dpo_kernels.linear_token_logprobs_and_kl(h3, x["weight"][mine], x["ref_hidden"], x["ref_weight"][mine],
                                                          x["labels"], bias=x["bias"][mine], backend=backend,
                                                          vocab_chunk_size=16, vocab_parallel_group=group, **opts)
        frozen_grads = _grads(frozen, [h3], x["upstream"])
        for name, a, e in zip(("logp", "ref_logp", "kl"), frozen, full, strict=True):
            _check(a, e, f"{backend} frozen head {name}")
        _check(frozen_grads[0], full_grads[0], f"{backend} frozen head dH")

        # policy only, and the statistics trainers log
        from dpo_kernels.ops.common import LinearHead
        from dpo_kernels.ops.vocab_parallel import vocab_slice
        from dpo_kernels.options import TokenOptions
        from dpo_kernels.ops.dispatch import linear_stats

        def run_linear_token_stats(*args, **kwargs):
            out = linear_stats(*args, **kwargs)
            return out.logp, out.logged

        token_opts = TokenOptions(**opts)
        _, logged_full = run_linear_token_stats(LinearHead(x["hidden"], x["weight"]), None, x["labels"], token_opts,
                                                backend, logging=True)
        _, logged = run_linear_token_stats(LinearHead(x["hidden"], x["weight"][mine]), None, x["labels"], token_opts,
                                           backend, logging=True, vocab_slice=vocab_slice(sizes[rank], group,
                                                                                          torch.device("cpu")))
        for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
            _check(logged[name], logged_full[name], f"{backend} logged {name}")
        assert torch.equal(logged["is_top1"], logged_full["is_top1"]), f"{backend} is_top1"

        # from logits: each rank's columns of the logits (a strided view of them)
        lf = x["logits"].clone().requires_grad_()
        full = dpo_kernels.token_logprobs_and_kl(lf, x["ref_logits"], x["labels"], backend=backend, **opts)
        (full_grad,) = _grads(full, [lf], x["upstream"])
        ls = x["logits"].clone().requires_grad_()
        vp = dpo_kernels.token_logprobs_and_kl(ls[..., mine], x["ref_logits"][..., mine], x["labels"],
                                               backend=backend, vocab_parallel_group=group, **opts)
        (grad,) = _grads(vp, [ls], x["upstream"])
        for name, a, e in zip(("logp", "ref_logp", "kl"), vp, full, strict=True):
            _check(a, e, f"{backend} logits {name}")
        _check(grad[..., mine], full_grad[..., mine], f"{backend} logits gradient slice")
        assert (grad[..., :start] == 0).all() and (grad[..., mine.stop:] == 0).all()

        # the DPO losses, policy and reference from hidden states
        _losses_match(x, mine, group, backend, max(sizes))


def _losses_match(x: dict, mine: slice, group, backend: str, widest_slice: int, store_bytes: int = 4,
                  tol: float = TOL, **options) -> None:
    """``store_bytes``: what the eager schedule keeps a logit in (4: fp32 tiles; 2: the scaled store, whose fp16
    weights round differently on each rank's maxima, hence ``tol``); ``options``: more for every call."""
    import dpo_kernels

    labels = x["labels"].clone()
    labels[-1] = labels[0]  # an even number of rows with something to score
    # the eager schedule in one group, in a group per pair (each group's statistics combined across the ranks;
    # every rank forms the same groups whatever its slice's width; a scaled store is one group at that budget,
    # keeping the vocabulary chunks that fit), and the recompute schedule
    pair_tokens = int((labels[:, 1:] != -100).sum(dim=1).max()) * 2
    per_pair = pair_tokens * widest_slice * (store_bytes + 4) * 2 / 2**20  # kept logits (and maxima), two heads
    schedules = ({}, {"schedule": "eager", "eager_budget_mb": per_pair}, {"schedule": "recompute"})
    for loss_type, schedule in ((t, s) for t in ("sigmoid", "tdpo2") for s in schedules):
        results = []
        for cols, kw in ((slice(None), {}), (mine, {"vocab_parallel_group": group, **schedule})):
            h, w = x["hidden"].clone().requires_grad_(), x["weight"][cols].clone().requires_grad_()
            out = dpo_kernels.fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w,
                                             ref_hidden=x["ref_hidden"], ref_lm_head_weight=x["ref_weight"][cols],
                                             loss_type=loss_type, beta=0.5, shift=True, backend=backend, **kw,
                                             **options)
            out.loss.backward()
            results.append((out, h.grad, w.grad))
        (full, dh_full, dw_full), (vp, dh, dw) = results
        _check(vp.loss, full.loss, f"{backend} {loss_type} {schedule} loss", tol)
        _check(dh, dh_full, f"{backend} {loss_type} {schedule} dH", tol)
        _check(dw, dw_full[mine], f"{backend} {loss_type} {schedule} dW slice", tol)
        for name, value in full.metrics.items():
            assert abs(vp.metrics[name] - value) <= tol * max(abs(value), 1.0), (backend, loss_type, name)


def scaled_store_checks(rank: int, world: int, backends: list[str]) -> None:
    """The eager schedule's scaled store (issue 29), forced as bf16 operands choose it on a GPU: every rank's DPO and
    TDPO2 losses and gradients against one process (fp32 loss to 1e-6; gradients to the fp16 weights' 2e-3)."""
    from dpo_kernels.ops.linear import plan, sources
    from dpo_kernels.ops.linear.products import Products

    plan.kept_store_dtype = lambda operands, sdt, opts: plan.SCALED_STORE_DTYPE
    formed, grad = [], sources.ScaledSource.grad
    sources.ScaledSource.grad = lambda self, *a, **k: formed.append(1) or grad(self, *a, **k)
    sizes = UNEVEN[world]
    start = sum(sizes[:rank])
    for backend in backends:
        _losses_match(_inputs(sum(sizes)), slice(start, start + sizes[rank]), dist.group.WORLD, backend, max(sizes),
                      store_bytes=2, tol=2e-3)
    # bf16 heads, widened to fp32 operands on the CPU (as an fp32 master head is rounded to bf16 on a GPU): each
    # rank converts its own slice's chunks where they are used; bf16 gradients
    converted, operand = [], Products.operand
    Products.operand = lambda self, t, *a: converted.append(t.dtype) or operand(self, t, *a)
    half = {k: [u.to(torch.bfloat16) for u in v] if isinstance(v, list) else
            (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _inputs(sum(sizes)).items()}
    _losses_match(half, slice(start, start + sizes[rank]), dist.group.WORLD, backends[0], max(sizes), store_bytes=2,
                  tol=5e-3)
    Products.operand = operand
    assert formed and torch.bfloat16 in converted, "the scaled store formed no dZ, or converted no bf16 head"
    # the backward's dH products two chunks a GEMM (plan.hidden_grad_batch, forced: the CPU has no waves to fill),
    # each rank over its own slice's chunks before dH is summed across the group
    batched, accumulate_batched = [], Products.accumulate_batched
    Products.accumulate_batched = lambda self, *a, **k: batched.append(1) or accumulate_batched(self, *a, **k)
    plan.hidden_grad_batch = lambda tokens, dim, device: 2
    _losses_match(_inputs(sum(sizes)), slice(start, start + sizes[rank]), dist.group.WORLD, backends[0], max(sizes),
                  store_bytes=2, tol=2e-3, vocab_chunk_size=8)
    assert batched, "no dH products were batched"


def dtensor_checks(rank: int, world: int, backend: str) -> None:
    """A head given as a DTensor sharded on dim 0 is a vocabulary-parallel head over its mesh; a data-parallel use of
    one (different tokens per rank) is refused."""
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import dpo_kernels

    vocab = 103
    x = _inputs(vocab)
    mesh = init_device_mesh("cpu", (world,))
    h = x["hidden"].clone().requires_grad_()
    w_full = x["weight"].clone().requires_grad_()
    full = dpo_kernels.linear_token_logprobs(h, w_full, x["labels"], backend=backend)
    full_grads = _grads(full, [h, w_full], x["upstream"])
    h2 = x["hidden"].clone().requires_grad_()
    w = distribute_tensor(x["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
    logp = dpo_kernels.linear_token_logprobs(h2, w, x["labels"], backend=backend)
    grads = _grads(logp, [h2, w], x["upstream"])
    _check(logp, full, "DTensor head log-probs")
    _check(grads[0], full_grads[0], "DTensor head dH")
    _check(grads[1].full_tensor(), full_grads[1], "DTensor head dW, gathered")

    labels = x["labels"].clone()
    labels[0, 5] = rank  # the ranks now hold different tokens, as data parallelism would
    with pytest.raises(ValueError, match="the ranks hold different labels"):
        dpo_kernels.linear_token_logprobs(x["hidden"], w, labels, backend=backend)


def plain_tensor_consistency_checks(rank: int, world: int, backend: str) -> None:
    """Plain sliced heads (no DTensor) with different labels or hidden states on different ranks: refused on every
    rank (before, each rank returned the same wrong answer); ``check_labels=False`` skips the check."""
    import pytest

    import dpo_kernels

    vocab = 103
    x = _inputs(vocab)
    bounds = [vocab * r // world for r in range(world + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])
    group = dist.group.WORLD
    w = x["weight"][mine]
    labels = x["labels"].clone()
    labels[0, 5] = rank  # different tokens per rank, as a data-parallel batch would be
    hidden = x["hidden"] + rank  # different hidden states per rank
    for call in (
        lambda: dpo_kernels.linear_token_logprobs(x["hidden"], w, labels, backend=backend, vocab_parallel_group=group),
        lambda: dpo_kernels.linear_token_logprobs(hidden, w, x["labels"], backend=backend, vocab_parallel_group=group),
        lambda: dpo_kernels.token_logprobs(x["hidden"] @ w.T, labels, backend=backend, vocab_parallel_group=group),
        lambda: dpo_kernels.fused_dpo_loss(labels=labels, policy_hidden=x["hidden"], lm_head_weight=w,
                                           reference_free=True, backend=backend, vocab_parallel_group=group),
    ):
        with pytest.raises(ValueError, match="the ranks hold different labels or hidden states"):
            call()
    same = dpo_kernels.linear_token_logprobs(x["hidden"], w, x["labels"], backend=backend, vocab_parallel_group=group)
    unchecked = dpo_kernels.linear_token_logprobs(x["hidden"], w, x["labels"], backend=backend,
                                                  vocab_parallel_group=group, check_labels=False)
    torch.testing.assert_close(unchecked, same)
