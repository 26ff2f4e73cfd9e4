"""Loading ``dpo_kernels._C`` (the C++/CUDA extension built by ``setup.py``) and saying why it cannot be used."""

from __future__ import annotations

import functools
import importlib
import platform

import torch

from ..build_config import read_build_info


@functools.lru_cache(maxsize=None)
def load() -> tuple[object | None, str | None]:
    """``(module, None)`` when ``dpo_kernels._C`` imports and its ops are registered, else ``(None, reason)``."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return None, "dpo_kernels._C is built for AVX2 and this CPU does not report AVX2"
    try:
        module = importlib.import_module("dpo_kernels._C")
    except ImportError as exc:
        return None, (
            f"dpo_kernels._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .` where a "
            "C++ compiler and torch are present (DPO_KERNELS_NO_EXTENSION=1 skips it on purpose)"
        )
    if not hasattr(torch.ops.dpo_kernels, "logits_forward"):
        return None, "dpo_kernels._C imported but registered no ops"
    return module, None


def cpu_unavailable_reason() -> str | None:
    return load()[1]


def cuda_unavailable_reason() -> str | None:
    module, reason = load()
    if reason is not None:
        return reason
    if not module.built_with_cuda():
        why = read_build_info().get("cuda_left_out") or "needs nvcc and a CUDA build of torch at build time"
        return f"dpo_kernels._C was built without its CUDA kernels: {why}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
