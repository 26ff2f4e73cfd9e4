"""Host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import torch

from ...options import TokenOptions
from ..registry import triton_interpreting

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


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow PyTorch's TF32 switch (off by default: exact fp32); 16-bit inputs use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Convert ``tl.dot`` operands to fp32 first: only for bf16 under the interpreter, whose bf16 dot multiplies raw
    bit patterns (triton-lang/triton#11584). Compiled kernels always use native bf16 tensor-core dots."""
    return dtype == torch.bfloat16 and triton_interpreting()


def require_supported_dtype(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' takes float16, bfloat16 or float32 inputs, got {t.dtype}; "
                "use backend='torch' for float64"
            )

