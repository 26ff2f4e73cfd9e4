"""A frozen head's accumulators kept at a lazily moved shift (issue 29, ``contract.fold_shifted``).

The frozen head's forward accumulates ``P = sum_v e^{z_v - s} t'(x_v) W_v`` per token. A backend's fused
``fold_shifted`` writes each tile's weights in the fold's one pass at the row's *shift* ``s``, which moves only when
the running max outgrows it by the headroom; the accumulator rows whose shift moved are rescaled, the others not
touched. The PyTorch fallback (``unfused_fold_shifted``) moves every shift to the max and rescales every row. Real
logits seldom move a shift after a row's first block, so these tests build logits that do: a spike later in a tile
(the blocks already written are rescaled), a spike in a later tile (the accumulator row is rescaled), a row that never
moves (its accumulator row must stay bit-identical), and a first block of ``-inf`` logits (a bias that masks columns).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_kernels import linear_token_logprobs, linear_token_logprobs_and_kl
from dpo_kernels.ops.linear import contract
from dpo_kernels.ops.linear.contract import Accumulator, LogitsTile, RefRow, StatRow, shift_headroom
from dpo_kernels.ops.registry import backend_kernels
from dpo_kernels.options import TokenOptions

from ..conftest import assert_close, backends_under_test, skip_if_unsupported

N, D, WIDTH = 5, 24, 5000  # a tile of 5000 columns: three of the Triton fold's 2048-wide blocks (five with a KL)
SPIKE = 70.0  # above the 32 of headroom of bf16 and fp32 weights


def _tiles(seed: int, with_ref: bool):
    """Two tiles of raw logits ``[N, WIDTH]``: row 0 spikes late in tile 0, row 1 in tile 1 (twice the spike), row 2
    never, row 3 has its spike at the very first column, row 4 spikes late in both tiles; the reference's rows spike
    elsewhere (row 2 in tile 1)."""
    g = torch.Generator().manual_seed(seed)
    tiles = [torch.randn(N, WIDTH, generator=g) * 2 for _ in range(2)]
    tiles[0][0, WIDTH - 7] += SPIKE
    tiles[1][1, WIDTH - 300] += 2 * SPIKE
    tiles[0][3, 0] += SPIKE
    tiles[0][4, 3000] += SPIKE
    tiles[1][4, 4999] += 2 * SPIKE
    refs = None
    if with_ref:
        refs = [torch.randn(N, WIDTH, generator=g) * 2 for _ in range(2)]
        refs[1][2, 4100] += SPIKE
        refs[0][0, 2500] += SPIKE
    return tiles, refs


def _sweep(kernels, tiles, refs, bias, opts, weights_dtype, fused: bool, device="cpu"):
    """Fold both tiles into fresh statistics and accumulators (``fused``: the backend's ``fold_shifted``, else the
    fallback), adding ``weights @ W_c`` after each as the frozen head's source does; returns the statistics, the
    accumulators, the weights of each tile, and the accumulator rows before the second tile's kernel."""
    device = torch.device(device)
    labels = torch.tensor([3, WIDTH + 10, 4999, 0, WIDTH + 4999], device=device)
    stats = contract.new_stats(N, torch.float32, device)
    ref_stats = None if refs is None else contract.new_ref_stats(N, torch.float32, device)
    g = torch.Generator().manual_seed(7)
    heads = [torch.randn(WIDTH, D, generator=g).to(device) for _ in tiles]
    bias = None if bias is None else bias.to(device)

    def accumulator():
        return Accumulator(torch.zeros(N, D, device=device), torch.full((N,), float("-inf"), device=device))

    acc, ref_acc = accumulator(), None if refs is None else accumulator()
    kept, before = [], None
    for i, x in enumerate(tiles):
        tile = LogitsTile(x.to(device, copy=True), bias, i * WIDTH, labels)
        ref = None if refs is None else LogitsTile(refs[i].to(device, copy=True), bias, i * WIDTH, labels)
        w = torch.empty(N, WIDTH, dtype=weights_dtype, device=device)
        wr = None if refs is None else torch.empty(N, WIDTH, dtype=weights_dtype, device=device)
        if i == 1:
            before = acc.values.clone()
        if fused:
            kernels.fold_shifted(tile, stats, ref, ref_stats, opts, w, wr, acc, ref_acc,
                                 shift_headroom(weights_dtype, opts))
        else:
            contract.unfused_fold_shifted(kernels, tile, stats, ref, ref_stats, opts, w, wr, acc, ref_acc)
        acc.values.add_(w.float() @ heads[i])
        if ref_acc is not None:
            ref_acc.values.add_(wr.float() @ heads[i])
        kept.append((w, wr))
    return stats, ref_stats, acc, ref_acc, kept, before


def _at_max(acc: Accumulator, m: torch.Tensor) -> torch.Tensor:
    return acc.values * contract.shift_factor(acc.shift, m).unsqueeze(1)


@pytest.mark.parametrize("with_ref", [False, True], ids=["policy", "with_kl"])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_fold_shifted_matches_the_fallback(backend, with_ref, weights_dtype, softcap):
    skip_if_unsupported(backend, torch.float32)
    check_fold_shifted(backend, with_ref, weights_dtype, softcap, "cpu")


def check_fold_shifted(backend: str, with_ref: bool, weights_dtype, softcap, device: str) -> None:
    """A backend's fused ``fold_shifted`` against the fallback on ``device`` (``test_gpu_backends.py``: CUDA)."""
    kernels = backend_kernels(backend, "test", torch.zeros(1, device=device)).tiles
    if kernels.fold_shifted is None:
        pytest.skip(f"backend {backend!r} has no fused fold_shifted (it runs the fallback this test compares with)")
    opts = TokenOptions(softcap=softcap)
    bias = torch.zeros(WIDTH)
    bias[:3000] = float("-inf")  # the first block of every row is -inf: its shift stays -inf through it
    tiles, refs = _tiles(0, with_ref)
    got = _sweep(kernels, tiles, refs, bias, opts, weights_dtype, fused=True, device=device)
    want = _sweep(kernels, tiles, refs, bias, opts, weights_dtype, fused=False, device=device)
    for a, b, what in ((got[0], want[0], "statistics"), (got[1], want[1], "reference statistics")):
        if a is not None:
            assert torch.equal(a.isfinite(), b.isfinite()), what
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=what)
    m = got[0][StatRow.MAX]
    for i in range(N):  # row by row: each row's sum has its own scale
        assert_close(_at_max(got[2], m)[i], _at_max(want[2], m)[i], weights_dtype, f"accumulator row {i}")
        if with_ref:
            mr = got[1][RefRow.MAX]
            assert_close(_at_max(got[3], mr)[i], _at_max(want[3], mr)[i], weights_dtype, f"reference row {i}")
    headroom = shift_headroom(weights_dtype, opts)
    for w, wr in got[4]:
        for kept in (w, wr):
            if kept is not None:
                assert torch.isfinite(kept).all() and kept.float().max() <= math.exp(headroom) * 1.01
    # the shift trails the max by at most the headroom, never leads it
    shift = got[2].shift
    assert (shift <= m).all() and (m - shift <= headroom + 1e-4).all()


@pytest.mark.parametrize("backend_name", ["triton", "cpu"])
def test_rows_whose_shift_stays_are_not_touched(backend_name):
    """The rescale is the point of the lazy shift: a row whose max stays within the headroom keeps its accumulator
    row bit-identical through the kernel (rows 0, 2 and 3 in the second tile), a row that moves is rescaled."""
    if backend_name not in backends_under_test():
        pytest.skip(f"the {backend_name} backend is not available")
    kernels = backend_kernels(backend_name, "test", torch.zeros(1)).tiles
    tiles, _ = _tiles(1, False)
    opts = TokenOptions()
    labels = torch.tensor([3, WIDTH + 10, 4999, 0, WIDTH + 4999])
    stats = contract.new_stats(N, torch.float32, torch.device("cpu"))
    acc = Accumulator(torch.zeros(N, D), torch.full((N,), float("-inf")))
    w = torch.empty(N, WIDTH)
    kernels.fold_shifted(LogitsTile(tiles[0].clone(), None, 0, labels), stats, None, None, opts, w, None, acc, None,
                         shift_headroom(w.dtype, opts))
    first_shift = acc.shift.clone()
    acc.values.copy_(torch.arange(N * D, dtype=torch.float32).view(N, D) + 1)
    before = acc.values.clone()
    kernels.fold_shifted(LogitsTile(tiles[1].clone(), None, WIDTH, labels), stats, None, None, opts, w, None, acc,
                         None, shift_headroom(w.dtype, opts))
    moved = acc.shift != first_shift
    assert moved.tolist() == [False, True, False, False, True]
    assert torch.equal(acc.values[~moved], before[~moved])
    factor = torch.exp(first_shift - acc.shift)[moved].unsqueeze(1)
    torch.testing.assert_close(acc.values[moved], before[moved] * factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "with_kl"])
def test_frozen_head_gradient_with_spiking_logits_matches_float64(backend, with_kl):
    """End to end: a frozen head whose last vocabulary rows give logits far above the rest (their shifts move late
    in a tile and in a later tile), hidden-state gradient against float64 autograd on full logits."""
    skip_if_unsupported(backend, torch.float32)
    g = torch.Generator().manual_seed(3)
    n, d, v = 12, 16, 9000
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.3
    weight[-40:] *= 60.0  # logits of tens to hundreds at the end of the vocabulary
    ref_weight = weight + 0.05 * torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:3] = torch.arange(v - 3, v)

    h = hidden.clone().requires_grad_()
    h64 = hidden.double().requires_grad_()
    logp = torch.log_softmax(h64 @ weight.double().T, -1)
    expected = logp.gather(1, labels[:, None]).squeeze(1)
    if with_kl:
        logps, _, kl = linear_token_logprobs_and_kl(h, weight, hidden, ref_weight, labels, backend=backend,
                                                    tile_budget_mb=0.2)
        log_q = torch.log_softmax(hidden.double() @ ref_weight.double().T, -1)
        (logps.sum() + 0.5 * kl.sum()).backward()
        (expected.sum() + 0.5 * (log_q.exp() * (log_q - logp)).sum()).backward()
    else:
        linear_token_logprobs(h, weight, labels, backend=backend, tile_budget_mb=0.2).sum().backward()
        expected.sum().backward()
    assert torch.isfinite(h.grad).all()
    assert_close(h.grad, h64.grad, torch.float32, "hidden gradient of a frozen head with spiking logits")


@pytest.mark.parametrize("with_ref", [False, True], ids=["policy", "with_kl"])
def test_the_store_shifts_without_sums_match_the_fallback(backend, with_ref):
    """The eager schedule's scaled store calls ``fold_shifted`` with shifts and no sums (``Accumulator.values`` None),
    each tile's new shifts written to rows of their own: each tile's fp16 weights, brought from the shift they were
    written at to the running max after the tile, are the fallback's weights at that max (the spikes move shifts
    late in a tile and in the second tile)."""
    skip_if_unsupported(backend, torch.float32)
    kernels = backend_kernels(backend, "test", torch.zeros(1)).tiles
    if kernels.fold_shifted is None:
        pytest.skip(f"backend {backend!r} has no fused fold_shifted (it runs the fallback this test compares with)")
    opts = TokenOptions()
    tiles, refs = _tiles(2, with_ref)
    labels = torch.tensor([3, WIDTH + 10, 4999, 0, WIDTH + 4999])

    def sweep(fused: bool):
        """Each tile's shifts written to rows of their own (``shift_out``), read from the previous tile's, as the
        scaled store keeps them; the rows read are left as they were."""
        stats = contract.new_stats(N, torch.float32, torch.device("cpu"))
        ref_stats = None if refs is None else contract.new_ref_stats(N, torch.float32, torch.device("cpu"))
        last = [torch.full((N,), float("-inf")) for _ in range(1 if refs is None else 2)]
        out = []
        for i, x in enumerate(tiles):
            w = torch.empty(N, WIDTH, dtype=torch.float16)
            wr = None if refs is None else torch.empty(N, WIDTH, dtype=torch.float16)
            shift = Accumulator(None, last[0], torch.full((N,), float("nan")))
            ref_shift = None if refs is None else Accumulator(None, last[1], torch.full((N,), float("nan")))
            read = [t.clone() for t in last]
            args = (LogitsTile(x.clone(), None, i * WIDTH, labels), stats,
                    None if refs is None else LogitsTile(refs[i].clone(), None, i * WIDTH, labels), ref_stats, opts,
                    w, wr, shift, ref_shift)
            if fused:
                kernels.fold_shifted(*args, shift_headroom(torch.float16, opts))
            else:
                contract.unfused_fold_shifted(kernels, *args)
            assert all(torch.equal(a, b) for a, b in zip(last, read, strict=True)), "the shifts read were written"
            last = [a.shift_out for a in (shift, ref_shift) if a is not None]
            assert not any(t.isnan().any() for t in last), "a shift was not written"
            at_max = w.double() * contract.shift_factor(shift.new_shift, stats[StatRow.MAX]).double().unsqueeze(1)
            out.append(at_max)
            if refs is not None:
                out.append(wr.double() * contract.shift_factor(ref_shift.new_shift, ref_stats[RefRow.MAX]).double()
                           .unsqueeze(1))
            assert w.float().max() <= math.exp(shift_headroom(torch.float16, opts)) * 1.01
        return out

    for got, want in zip(sweep(True), sweep(False), strict=True):
        for i in range(N):
            assert_close(got[i], want[i], torch.float16, f"weights of row {i} at the max")


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_backends_with_fused_kernels_never_run_the_pytorch_ops_forms(backend_name, monkeypatch):
    """A backend that has ``fold_shifted`` and ``scaled_grad`` runs them: a frozen head (with the KL) and a forced
    scaled store (TDPO2: the reference's weights too) never reach ``unfused_fold_shifted`` / ``unfused_scaled_grad``
    (the PyTorch-ops forms a backend without the slots gets)."""
    skip_if_unsupported(backend_name, torch.float32)
    from dpo_kernels import fused_dpo_loss
    from dpo_kernels.ops.linear import plan

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch-ops form ran on a backend with the fused kernel")

    monkeypatch.setattr(contract, "unfused_fold_shifted", refuse)
    monkeypatch.setattr(contract, "unfused_scaled_grad", refuse)
    g = torch.Generator().manual_seed(5)
    n, d, v = 24, 16, 300
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight, ref_weight = torch.randn(v, d, generator=g), torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    logps, _, kl = linear_token_logprobs_and_kl(hidden, weight, hidden.detach(), ref_weight, labels,
                                                backend=backend_name, tile_budget_mb=0.01)
    (logps.sum() + kl.sum()).backward()
    monkeypatch.setattr(plan, "kept_store_dtype", lambda operands, sdt, opts: plan.SCALED_STORE_DTYPE)
    pair_labels = labels.view(4, 6).clone()
    pair_labels[:, 0] = -100  # a prompt position
    out = fused_dpo_loss(labels=pair_labels, policy_hidden=hidden.detach().view(4, 6, d).requires_grad_(),
                         lm_head_weight=weight.clone().requires_grad_(), ref_hidden=hidden.detach().view(4, 6, d),
                         ref_lm_head_weight=ref_weight, loss_type="tdpo2", backend=backend_name, schedule="eager")
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all()
