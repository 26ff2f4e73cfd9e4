"""The from-logits ``fold`` row kernels (issue 28): every backend writes the named statistics of the tile loop for a
whole row (StatRow / RefRow), which a vocabulary slice of the logits combines across ranks. Checked against the same
backend's finished forward (lse, log-probs, KL) on strided half and fp32 logits, with labels another rank holds (out
of the row's range: no label logit) and ignored tokens."""

from __future__ import annotations

import importlib

import pytest
import torch

from dpo_kernels.ops import registry
from dpo_kernels.ops.linear.contract import RefRow, StatRow, finish_lse, new_ref_stats, new_stats
from dpo_kernels.options import TokenOptions, statistics_dtype

from ..conftest import assert_close, backends_under_test, skip_if_unsupported

V = 37


def _kernels(backend: str):
    return importlib.import_module(registry._BACKENDS[backend].module).KERNELS.logits


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, V, 6, generator=g) * 3).to(dtype).transpose(1, 2)  # [2, 6, V], strided rows
    ref_logits = (torch.randn(2, 6, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, 0], labels[0, 1], labels[1, 2] = -100, -1, V + 3  # ignored, and two labels another rank holds
    return logits, ref_logits, labels.reshape(-1).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b != "reference"])
def test_row_fold_gives_the_forward_statistics_unfinished(backend, dtype):
    skip_if_unsupported(backend, dtype)
    logits, ref_logits, labels = _inputs(dtype)
    opts = TokenOptions(softcap=4.0, temperature=0.8)
    kernels = _kernels(backend)
    sdt = statistics_dtype(dtype)
    stats, ref_stats = new_stats(labels.numel(), sdt, logits.device), new_ref_stats(labels.numel(), sdt, logits.device)
    kernels.fold(logits, ref_logits, labels, opts, stats, ref_stats)
    in_row = (labels >= 0) & (labels < V)
    # the finished forward on the labels in the row (an out-of-range label would give NaN log-probs there)
    logp, lse, ref_logp, ref_lse, kl = kernels.forward(logits, ref_logits, torch.where(in_row, labels, -100), opts)
    lse_from_fold = finish_lse(stats[StatRow.MAX], stats[StatRow.SUM])
    ref_lse_from_fold = finish_lse(ref_stats[RefRow.MAX], ref_stats[RefRow.SUM])
    assert_close(lse_from_fold[in_row], lse[in_row], torch.float32, f"{backend}: lse from the fold")
    assert_close(ref_lse_from_fold[in_row], ref_lse[in_row], torch.float32, f"{backend}: reference lse from the fold")
    kl_from_fold = ref_stats[RefRow.WEIGHTED] / ref_stats[RefRow.SUM] - ref_lse_from_fold + lse_from_fold
    assert_close(kl_from_fold[in_row], kl[in_row], torch.float32, f"{backend}: KL from the fold")
    assert_close(stats[StatRow.LABEL_LOGIT][in_row], (logp + lse)[in_row], torch.float32, f"{backend}: label logit")
    assert_close(ref_stats[RefRow.LABEL_LOGIT][in_row], (ref_logp + ref_lse)[in_row], torch.float32,
                 f"{backend}: reference label logit")
    held_elsewhere = (labels != -100) & ~in_row
    assert held_elsewhere.sum() == 2
    assert (stats[StatRow.LABEL_LOGIT][held_elsewhere] == 0).all()
    assert (ref_stats[RefRow.LABEL_LOGIT][held_elsewhere] == 0).all()


@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b != "reference"])
def test_row_backward_adds_no_one_hot_for_a_label_held_elsewhere(backend):
    """The backward's contract for a vocabulary slice: a label outside the row adds no one-hot, so the row's
    gradient is -g p (against the same backend with the label's one-hot subtracted back out)."""
    logits, _, labels = _inputs(torch.float32)
    opts = TokenOptions()
    kernels = _kernels(backend)
    lse = torch.logsumexp(logits.float(), dim=-1).reshape(-1)
    g = torch.linspace(0.5, 1.5, labels.numel())
    g = torch.where(labels == -100, 0.0, g)
    grad = torch.empty(logits.shape)
    kernels.backward(logits, None, labels, lse, None, g, None, opts, grad)
    p = torch.softmax(logits.float(), dim=-1).reshape(-1, V)
    expected = -g.unsqueeze(1) * p
    rows = torch.nonzero((labels >= 0) & (labels < V)).squeeze(1)
    expected[rows, labels[rows]] += g[rows]
    expected[labels == -100] = 0
    assert_close(grad.reshape(-1, V), expected, torch.float32, f"{backend}: gradient with labels held elsewhere")
