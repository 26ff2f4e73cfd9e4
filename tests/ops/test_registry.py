"""The dispatcher: availability report, explicit requests never fall back, ``auto`` logs its choice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from dpo_kernels import BackendUnavailableError, available_backends
from dpo_kernels.ops import registry


def test_report_lists_every_backend_with_a_reason():
    report = available_backends()
    assert {"reference", "torch"} <= set(report)
    for status in report.values():
        assert status.reason and status.summary
        assert status.available == (status.reason == "available")


CPU_AUTO = "cpu" if available_backends()["cpu"].available else "torch"


def test_auto_picks_the_fastest_cpu_backend_and_logs_it(caplog):
    """The C++ backend when dpo_kernels._C is built, else chunked torch."""
    with caplog.at_level(logging.DEBUG, logger="dpo_kernels"):
        name, _ = registry.resolve_backend("auto", torch.device("cpu"))
    assert name == CPU_AUTO
    assert f"backend='auto' chose '{CPU_AUTO}' for device cpu" in caplog.text


def test_auto_never_picks_the_reference():
    for device in ("cpu", "cuda", "meta"):
        assert registry.resolve_backend("auto", torch.device(device))[0] != "reference"


def test_unavailable_backend_raises_with_reason(monkeypatch):
    spec = registry.BackendSpec(
        name="fake",
        module="dpo_kernels.ops.torch_chunked",
        devices=lambda: ("cuda",),
        auto_devices=("cuda",),
        auto_rank=1,
        dtypes=None,
        check=lambda: "the fake toolkit is not installed",
        summary="test double",
    )
    monkeypatch.setitem(registry._BACKENDS, "fake", spec)
    with pytest.raises(BackendUnavailableError, match="backend='fake' is not available: the fake toolkit"):
        registry.resolve_backend("fake", torch.device("cuda"))
    # auto skips it silently (it is unavailable), an explicit request never does
    assert registry.resolve_backend("auto", torch.device("cuda"))[0] != "fake"
    assert available_backends()["fake"].reason == "the fake toolkit is not installed"


def test_backend_on_wrong_device_raises(monkeypatch):
    spec = registry.BackendSpec(
        "gpuonly", "dpo_kernels.ops.torch_chunked", lambda: ("cuda",), ("cuda",), 1, None, lambda: None, "test double"
    )
    monkeypatch.setitem(registry._BACKENDS, "gpuonly", spec)
    with pytest.raises(BackendUnavailableError, match="runs on cuda tensors, but the inputs are on cpu"):
        registry.resolve_backend("gpuonly", torch.device("cpu"))


def test_dtype_routing(monkeypatch):
    """auto skips a backend that cannot take the dtype; an explicit request for it raises."""
    spec = registry.BackendSpec(
        "halfonly", "dpo_kernels.ops.torch_chunked", lambda: ("*",), ("*",), 1, (torch.bfloat16,), lambda: None, "t"
    )
    monkeypatch.setitem(registry._BACKENDS, "halfonly", spec)
    assert registry.resolve_backend("auto", torch.device("cpu"), torch.bfloat16)[0] == "halfonly"
    assert registry.resolve_backend("auto", torch.device("cpu"), torch.float64)[0] == CPU_AUTO
    with pytest.raises(BackendUnavailableError, match="takes bfloat16 inputs, got torch.float64"):
        registry.resolve_backend("halfonly", torch.device("cpu"), torch.float64)


def test_triton_is_never_auto_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "cpu" in registry._BACKENDS["triton"].devices()
    assert registry.resolve_backend("auto", torch.device("cpu"), torch.float32)[0] == CPU_AUTO


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report, where Triton is unavailable")
def test_python_m_dpo_kernels_reports_and_self_checks():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "dpo_kernels"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"backend='auto' on cpu: {CPU_AUTO}" in result.stdout
    triton_row = next(line for line in result.stdout.splitlines() if line.startswith("triton "))
    assert " no " in triton_row and ("no CUDA device" in triton_row or "not installed" in triton_row)
    assert "self-check passed" in result.stdout
    verdicts = [line.split()[-1] for line in result.stdout.splitlines() if line.split()[-1:] in (["ok"], ["FAIL"])]
    backends = 2 if CPU_AUTO == "cpu" else 1  # torch, and cpu when built
    assert verdicts == ["ok"] * (6 * backends), result.stdout


def test_without_the_extension_cpu_and_cuda_report_why_and_the_rest_works(monkeypatch):
    from dpo_kernels import token_logprobs
    from dpo_kernels.ops import extension

    monkeypatch.setattr(extension, "load", lambda: (None, "dpo_kernels._C is not built (simulated)"))
    report = available_backends()
    for name in ("cpu", "cuda"):
        assert not report[name].available and "not built (simulated)" in report[name].reason
    assert registry.resolve_backend("auto", torch.device("cpu"))[0] == "torch"
    logits, labels = torch.randn(1, 2, 7), torch.tensor([[1, 3]])
    with pytest.raises(BackendUnavailableError, match="backend='cpu' is not available: dpo_kernels._C is not built"):
        token_logprobs(logits, labels, backend="cpu")
    torch.testing.assert_close(token_logprobs(logits, labels), token_logprobs(logits, labels, backend="reference"))
