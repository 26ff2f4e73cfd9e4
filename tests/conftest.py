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
