"""Host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch

from ...options import TokenOptions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def transform_args(opts: TokenOptions) -> dict:
    """Scalar arguments and constexpr flags of ``jit_helpers.transform`` for these options."""
    return dict(
        logit_scale=float(opts.logit_scale),
        softcap=float(opts.softcap) if opts.softcap is not None else 1.0,
        inv_temperature=1.0 / float(opts.temperature),
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_TEMPERATURE=opts.temperature != 1.0,
    )


def require_supported_dtype(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' takes float16, bfloat16 or float32 inputs, got {t.dtype}; "
                "use backend='torch' for float64"
            )



def on_device(t: torch.Tensor):
    """The device guard of a Triton launch: Triton launches on the *current* CUDA device, so a model split over GPUs
    in one process (``device_map``) would otherwise run a kernel on another GPU than its tensors'. A no-op off CUDA
    (the interpreter, the CPU)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
