"""Time of every case x implementation x shape preset, forward and forward+backward (pytest-benchmark).

    pytest benchmarks --benchmark-only -k cpu --benchmark-json=benchmarks/out/cpu/field.json

GPU presets (Llama-3-8B-like and Gemma-2-like heads at 4k-16k tokens) are skipped without a GPU; an implementation
that is not installed or cannot run here is skipped with its reason. Before an implementation is timed, its output
is checked against dpo_kernels' (fp32: 1e-4 of the largest magnitude, bf16: 3e-2). On GPU the peak allocator bytes
of one run go into ``extra_info``; CPU peak memory is measured in subprocesses by ``benchmarks/report.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from field import CASES, PRESETS, implementations, make_inputs, why_unavailable

PARAMS = [
    pytest.param(preset, case, impl.name, tokens, id=f"{preset}-{case}-{impl.name}-N{tokens}")
    for preset, p in PRESETS.items()
    for case in CASES
    for impl in implementations(case)
    if p.device in impl.devices
    for tokens in p.tokens
]


@functools.cache
def _inputs(preset: str, case: str, tokens: int):
    return make_inputs(case, PRESETS[preset], tokens)


@functools.cache
def _expected(preset: str, case: str, tokens: int):
    device = PRESETS[preset].device
    ours = next(i for i in implementations(case) if i.name == f"dpo_kernels[{'cpu' if device == 'cpu' else 'triton'}]")
    if why_unavailable(ours, device):
        ours = next(i for i in implementations(case) if i.name == "dpo_kernels[torch]" and device in i.devices)
    with torch.no_grad():
        return ours.run(_inputs(preset, case, tokens)).float()


def _leaves(x: dict) -> dict:
    return {k: (v.detach().requires_grad_(k in ("logits", "hidden", "weight")) if v.is_floating_point() else v)
            for k, v in x.items()}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("preset, case, impl_name, tokens", PARAMS)
def test_field(benchmark, preset, case, impl_name, tokens, mode):
    p = PRESETS[preset]
    if p.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"preset {preset!r} needs a CUDA device")
    impl = next(i for i in implementations(case) if i.name == impl_name and p.device in i.devices)
    reason = why_unavailable(impl, p.device)
    if reason:
        pytest.skip(reason)
    x = _inputs(preset, case, tokens)
    with torch.no_grad():
        got = impl.run(x).float()
    expected = _expected(preset, case, tokens)
    err = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    assert got.shape == expected.shape and err <= tol, f"{impl_name} disagrees with dpo_kernels: {err:.2e} > {tol}"

    def run():
        leaves = _leaves(x)
        out = impl.run(leaves)
        if mode == "fwd+bwd":
            out.float().sum().backward()
        if p.device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{preset} {case} {mode} N={tokens}"
    benchmark.extra_info.update(case=case, impl=impl_name, preset=preset, tokens=tokens, mode=mode,
                                device=p.device, max_error=err)
    if p.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_allocated_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
