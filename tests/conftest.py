"""Shared fixtures: which backends are under test, tolerances per dtype, and comparison helpers.

Without a GPU the Triton kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before anything
imports Triton, unless the environment already says otherwise.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dpo_kernels.ops import registry  # noqa: E402

# Relative tolerance per dtype, against the reference backend. fp64 and fp32 are the bounds. bf16/fp16:
# both backends compute fp32 statistics from the same rounded inputs, but the linear path's products round
# differently (the reference multiplies in bf16, the torch backend upcasts). Worst seen: bf16 6.5e-3, fp16 8.8e-4.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def backends_under_test() -> list[str]:
    """Every available non-reference backend that runs on CPU tensors (Triton through its interpreter)."""
    return registry.backends_for("cpu")


@pytest.fixture(params=backends_under_test())
def backend(request) -> str:
    return request.param


def skip_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    spec = registry._BACKENDS[backend]
    if not spec.takes((dtype,)):
        pytest.skip(f"backend {backend!r} does not take {dtype} inputs (it raises a clear error instead)")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max error relative to the largest magnitude of ``expected`` (elementwise relative error is meaningless
    where the value crosses zero), in float64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().clamp(min=1e-30).item()
    err = (a - e).abs().max().item() / scale if a.numel() else 0.0
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.1e} ({dtype})"


def compare_with_reference(fn, inputs: dict, wrt: tuple[str, ...], backend: str, dtype: torch.dtype,
                           mask: torch.Tensor):
    """``fn(leaves, backend)`` on ``backend`` against the reference oracle: every output (fp32 statistics, or fp64 for
    fp64 inputs; exactly 0 where ``mask`` is False) and the gradient of every input named in ``wrt`` (its own dtype
    and shape) under one random upstream gradient per output, on whatever device the inputs are. Returns the
    backend's gradients."""
    results = {}
    g = torch.Generator().manual_seed(99)
    upstream = None
    for be in ("reference", backend):
        leaves = {k: (v.detach().requires_grad_(k in wrt) if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in inputs.items()}
        outs = fn(leaves, be)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if upstream is None:
            upstream = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
        diff = [(o, u) for o, u in zip(outs, upstream, strict=True) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], [leaves[k] for k in wrt], [u for _, u in diff])
        results[be] = (outs, grads)
    (ref_outs, ref_grads), (outs, grads) = results["reference"], results[backend]
    for i, (o, e) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), "statistics dtype"
        assert_close(o, e, dtype, f"output {i}")
        assert (o.reshape(mask.shape)[~mask] == 0).all(), f"output {i} must be exactly 0 at masked positions"
    for k, gr, e in zip(wrt, grads, ref_grads, strict=True):
        assert gr.dtype == inputs[k].dtype and gr.shape == inputs[k].shape, f"grad {k}: dtype/shape"
        assert_close(gr, e, dtype, f"grad {k}")
    return grads
