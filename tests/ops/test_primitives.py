"""Every primitive of every backend, value and gradient, against the reference backend (MATH.md §1).

Cases: odd vocabularies (1000, 32001), masked positions and a fully masked row, softcap / logit_scale / temperature,
non-contiguous inputs (a shifted slice, a transposed layout, a column-major head), leading dimensions other than
``[B, T]``, and tile sizes that divide neither the token count nor the vocabulary. Upstream gradients are random
and non-zero at masked positions, which must still receive exactly zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dpo_kernels import linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs, token_logprobs_and_kl

from ..conftest import assert_close, compare_with_reference, skip_if_unsupported

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Case:
    name: str
    rows: int = 3
    seq: int = 9
    vocab: int = 1000
    hidden: int = 48
    options: dict = field(default_factory=dict)
    layout: str = "contiguous"  # "contiguous" | "sliced" | "transposed" | "leading"
    mask: bool = True
    bias: bool = True


CASES = [
    Case("plain", mask=False, bias=False),
    Case("masked"),
    Case("transformed", options=dict(softcap=2.5, logit_scale=1.7, temperature=0.6)),
    Case("transformed_no_bias", bias=False, options=dict(softcap=2.5, temperature=0.6)),
    Case("sliced", layout="sliced", options=dict(token_chunk_size=4)),
    Case("transposed", layout="transposed", options=dict(token_chunk_size=5)),
    Case("leading_dims", layout="leading"),
    Case("small_tiles", options=dict(token_chunk_size=7, vocab_chunk_size=333)),
    Case("vocab_32001", rows=2, seq=3, vocab=32001, hidden=16, options=dict(vocab_chunk_size=4096)),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same ``[R, T, K]`` values in the requested memory layout."""
    if layout == "sliced":  # logits[:, :-1] of a longer tensor: R and T cannot merge
        padded = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return padded[:, :-1]
    if layout == "transposed":  # stored [T, R, K]
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _labels(case: Case, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, case.vocab, (case.rows, case.seq), generator=g)
    if case.mask:
        labels[0, :3] = -100
        labels[-1] = -100  # a fully masked row
    return labels


def _reshape_leading(t: torch.Tensor, case: Case) -> torch.Tensor:
    """For the "leading" layout, present ``[R, T, ...]`` as ``[R*T]``-style ``[N, ...]`` inputs (2-D logits)."""
    return t.reshape(case.rows * case.seq, *t.shape[2:]) if case.layout == "leading" else t


def _make_logits(case: Case, dtype: torch.dtype, g: torch.Generator):
    labels = _labels(case, g)
    logits = (torch.randn(case.rows, case.seq, case.vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    ref_logits = (torch.randn(case.rows, case.seq, case.vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits, ref_logits = _layout(logits, case.layout), _layout(ref_logits, case.layout)
    return {
        "logits": _reshape_leading(logits, case),
        "ref_logits": _reshape_leading(ref_logits, case),
        "labels": _reshape_leading(labels, case),
    }


def _make_head(case: Case, dtype: torch.dtype, g: torch.Generator):
    labels = _labels(case, g)
    d, v = case.hidden, case.vocab
    hidden = torch.randn(case.rows, case.seq, d, generator=g, dtype=torch.float64).to(dtype)
    ref_hidden = torch.randn(case.rows, case.seq, d + 3, generator=g, dtype=torch.float64).to(dtype)
    # column-major head weight for the non-contiguous layouts
    weight = (torch.randn(d, v, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
    weight = weight.T if case.layout != "contiguous" else weight.T.contiguous()
    ref_weight = (torch.randn(v, d + 3, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if case.bias else None
    return {
        "hidden": _reshape_leading(_layout(hidden, case.layout), case),
        "ref_hidden": _reshape_leading(_layout(ref_hidden, case.layout), case),
        "weight": weight,
        "ref_weight": ref_weight,
        "bias": bias,
        "labels": _reshape_leading(labels, case),
    }


def _opts(case: Case, backend: str) -> dict:
    opts = dict(case.options)
    opts.pop("vocab_chunk_size", None)
    return dict(opts, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_token_logprobs(backend, case, dtype):
    skip_if_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(0)
    x = _make_logits(case, dtype, g)
    mask = x["labels"] != -100
    grads = compare_with_reference(
        lambda t, be: token_logprobs(t["logits"], x["labels"], **_opts(case, be)), x, ("logits",), backend, dtype, mask
    )
    assert (grads[0][~mask] == 0).all(), "masked positions must receive exactly zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_token_logprobs_and_kl(backend, case, dtype):
    skip_if_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(1)
    x = _make_logits(case, dtype, g)
    mask = x["labels"] != -100
    grads = compare_with_reference(
        lambda t, be: token_logprobs_and_kl(t["logits"], t["ref_logits"], x["labels"], **_opts(case, be)),
        x,
        ("logits",),
        backend,
        dtype,
        mask,
    )
    assert (grads[0][~mask] == 0).all()


def _head_wrt(case: Case, head: str = "trainable") -> tuple[str, ...]:
    """The inputs differentiated: the hidden states alone for a frozen head (LoRA), which takes the frozen-head
    forward (issue 29: the hidden states' gradient formed in the forward)."""
    if head == "frozen":
        return ("hidden",)
    return ("hidden", "weight", "bias") if case.bias else ("hidden", "weight")


HEADS = ["trainable", "frozen"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_linear_token_logprobs(backend, case, dtype, head):
    skip_if_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(2)
    x = _make_head(case, dtype, g)
    mask = x["labels"] != -100
    vocab_chunk = case.options.get("vocab_chunk_size")
    compare_with_reference(
        lambda t, be: linear_token_logprobs(
            t["hidden"], t["weight"], x["labels"], bias=t["bias"], vocab_chunk_size=vocab_chunk, **_opts(case, be)
        ),
        x,
        _head_wrt(case, head),
        backend,
        dtype,
        mask,
    )


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_linear_token_logprobs_and_kl(backend, case, dtype, head):
    skip_if_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(3)
    x = _make_head(case, dtype, g)
    mask = x["labels"] != -100
    vocab_chunk = case.options.get("vocab_chunk_size")
    compare_with_reference(
        lambda t, be: linear_token_logprobs_and_kl(
            t["hidden"],
            t["weight"],
            t["ref_hidden"],
            t["ref_weight"],
            x["labels"],
            bias=t["bias"],
            ref_bias=None,
            vocab_chunk_size=vocab_chunk,
            **_opts(case, be),
        ),
        x,
        _head_wrt(case, head),
        backend,
        dtype,
        mask,
    )


def test_reference_side_gets_no_gradient(backend):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 17, generator=g, requires_grad=True)
    ref_logits = torch.randn(2, 3, 17, generator=g, requires_grad=True)
    labels = torch.randint(0, 17, (2, 3), generator=g)
    logp, ref_logp, kl = token_logprobs_and_kl(logits, ref_logits, labels, backend=backend)
    assert not ref_logp.requires_grad
    (logp.sum() + kl.sum()).backward()
    assert ref_logits.grad is None and logits.grad is not None
    hidden, weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(17, 4, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(17, 4, requires_grad=True)
    _, ref_logp, kl = linear_token_logprobs_and_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend)
    kl.sum().backward()
    assert ref_hidden.grad is None and ref_weight.grad is None and weight.grad is not None


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_extreme_logits_stay_finite(backend, scale):
    """fp32 logits of magnitude 1e4 and 1e-4, against the fp64 reference. Errors are measured on the scale of the
    log-probs, since a KL of 1e-8 between near-uniform rows is below fp32 resolution of the terms it comes from."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 5, 31, generator=g) * scale).requires_grad_()
    ref_logits = torch.randn(2, 5, 31, generator=g) * scale
    labels = torch.randint(0, 31, (2, 5), generator=g)
    outs = token_logprobs_and_kl(logits, ref_logits, labels, backend=backend)
    expected = token_logprobs_and_kl(logits.double(), ref_logits.double(), labels, backend="reference")
    log_scale = max(expected[0].abs().max().item(), 1.0)
    for name, o, e in zip(("logp", "ref_logp", "kl"), outs, expected, strict=True):
        assert torch.isfinite(o).all(), name
        err = (o.double() - e).abs().max().item() / log_scale
        assert err <= 1e-6, f"{name}: error {err:.2e} of the log-prob scale"
    (outs[0].sum() + outs[2].sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_empty_vocab_tail_tile_and_single_token(backend):
    """One token, V smaller than the tile, and a vocab tile of width 1."""
    hidden, weight = torch.randn(1, 1, 3), torch.randn(5, 3)
    labels = torch.tensor([[4]])
    got = linear_token_logprobs(hidden, weight, labels, backend=backend, vocab_chunk_size=1)
    expected = linear_token_logprobs(hidden, weight, labels, backend="reference")
    assert_close(got, expected, torch.float32, "single token")
