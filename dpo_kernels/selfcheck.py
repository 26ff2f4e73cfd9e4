"""A short correctness check of every available backend against the ``reference`` backend on synthetic data.

Used by ``python -m dpo_kernels``. Shapes are small (a few hundred tokens, V = 1000) so it runs in seconds on a CPU.
Each backend runs each case once untimed before the timed run, so compilation is not in the milliseconds shown.
The inputs use a mask with a fully masked row, a softcap and a temperature, and tiles that do not divide the sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .dpo import fused_dpo_loss
from .ops.registry import backends_for
from .primitives import linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs, token_logprobs_and_kl
from .timing import synchronize

# fp32 against the reference: relative error on values and on gradients.
TOLERANCE = 1e-4


def _synthetic(device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, seq, hidden, vocab = 4, 33, 64, 1000
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, :5] = -100
    labels[1] = -100  # a fully masked row
    tensors = {
        "labels": labels,
        "logits": torch.randn(rows, seq, vocab, generator=g) * 4,
        "ref_logits": torch.randn(rows, seq, vocab, generator=g) * 4,
        "hidden": torch.randn(rows, seq, hidden, generator=g),
        "weight": torch.randn(vocab, hidden, generator=g) * 0.2,
        "bias": torch.randn(vocab, generator=g) * 0.1,
        "ref_hidden": torch.randn(rows, seq, hidden, generator=g),
        "ref_weight": torch.randn(vocab, hidden, generator=g) * 0.2,
    }
    return {k: v.to(device) for k, v in tensors.items()}


def _cases(data: dict[str, torch.Tensor]) -> dict[str, tuple[Callable, tuple[str, ...]]]:
    """name -> (function of (tensors, backend) returning outputs, names of the inputs to differentiate)."""
    opts = dict(softcap=30.0, temperature=0.9, token_chunk_size=17)
    d = data
    return {
        "token_logprobs": (lambda t, b: token_logprobs(t["logits"], d["labels"], backend=b, **opts), ("logits",)),
        "token_logprobs_and_kl": (
            lambda t, b: token_logprobs_and_kl(t["logits"], d["ref_logits"], d["labels"], backend=b, **opts),
            ("logits",),
        ),
        "linear_token_logprobs": (
            lambda t, b: linear_token_logprobs(
                t["hidden"], t["weight"], d["labels"], bias=t["bias"], backend=b, vocab_chunk_size=300, **opts
            ),
            ("hidden", "weight", "bias"),
        ),
        "linear_token_logprobs_and_kl": (
            lambda t, b: linear_token_logprobs_and_kl(
                t["hidden"], t["weight"], d["ref_hidden"], d["ref_weight"], d["labels"], bias=t["bias"], backend=b,
                vocab_chunk_size=300, **opts,
            ),
            ("hidden", "weight", "bias"),
        ),
        "fused_dpo_loss sigmoid": (
            lambda t, b: fused_dpo_loss(
                labels=d["labels"], policy_hidden=t["hidden"], lm_head_weight=t["weight"], ref_hidden=d["ref_hidden"],
                ref_lm_head_weight=d["ref_weight"], loss_type="sigmoid", beta=0.1, backend=b,
            ).loss,
            ("hidden", "weight"),
        ),
        "fused_dpo_loss tdpo2": (
            lambda t, b: fused_dpo_loss(
                labels=d["labels"], policy_logits=t["logits"], ref_logits=d["ref_logits"], loss_type="tdpo2",
                beta=0.1, backend=b,
            ).loss,
            ("logits",),
        ),
    }


def _run(fn: Callable, data: dict[str, torch.Tensor], wrt: tuple[str, ...], backend: str):
    leaves = {k: v.detach().clone().requires_grad_(k in wrt) for k, v in data.items() if v.is_floating_point()}
    outs = fn(leaves, backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # A fixed, uneven weighting of every differentiable output exercises every gradient path.
    total = sum((o.double() * (i + 1.3)).sum() for i, o in enumerate(outs) if o.requires_grad)
    total.backward()
    return [o.detach() for o in outs], [leaves[k].grad for k in wrt]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def run_selfcheck(device: torch.device) -> bool:
    """Print one row per (backend, case) with the relative errors seen; True when all are within tolerance."""
    data = _synthetic(device)
    backends = backends_for(device.type)
    print(f"self-check on {device}: fp32, 4 x 33 tokens, V=1000, D=64; tolerance {TOLERANCE:g} relative")
    print(f"{'backend':<10} {'case':<30} {'value err':>10} {'grad err':>10} {'ms':>8}  result")
    ok = True
    for name, (fn, wrt) in _cases(data).items():
        expected_out, expected_grads = _run(fn, data, wrt, "reference")
        for backend in backends:
            _run(fn, data, wrt, backend)  # warm-up: first-call compilation is not part of the time shown
            synchronize(device)
            start = time.perf_counter()
            out, grads = _run(fn, data, wrt, backend)
            synchronize(device)
            elapsed = (time.perf_counter() - start) * 1e3
            value_err = max(_rel_err(o, e) for o, e in zip(out, expected_out, strict=True))
            grad_err = max(_rel_err(g, e) for g, e in zip(grads, expected_grads, strict=True))
            passed = value_err <= TOLERANCE and grad_err <= TOLERANCE
            ok &= passed
            verdict = "ok" if passed else "FAIL"
            print(f"{backend:<10} {name:<30} {value_err:>10.2e} {grad_err:>10.2e} {elapsed:>8.1f}  {verdict}")
    print("self-check passed" if ok else "self-check FAILED")
    return ok
