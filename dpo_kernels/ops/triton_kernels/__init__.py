"""The ``triton`` backend: Triton kernels for the four primitives (GPU; on the CPU under ``TRITON_INTERPRET=1``).

``logits.py`` holds the from-logits kernels, ``linear.py`` the fused head kernels, ``config.py`` the launch
heuristics and autotuner, ``jit_helpers.py`` the device functions they share. Inputs are fp16, bf16 or fp32;
statistics are fp32. This module exposes the backend interface of ``dpo_kernels.ops.registry``.
"""

from __future__ import annotations

import torch

from ...options import TokenOptions
from ..common import LinearHead
from .launch import require_supported_dtype
from .linear import TritonLinearTokenLogprobs, TritonLinearTokenLogprobsAndKL
from .logits import TritonTokenLogprobs, TritonTokenLogprobsAndKL


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    require_supported_dtype(logits)
    return TritonTokenLogprobs.apply(logits, labels, opts)


def token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions):
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
    require_supported_dtype(logits, ref_logits)
    return TritonTokenLogprobsAndKL.apply(logits, labels, ref_logits.detach(), opts)


def linear_token_logprobs(hidden, weight, bias, labels, opts: TokenOptions):
    """``hidden [R, T, D]``, ``weight [V, D]``, ``bias [V]`` or ``None`` -> ``logp [R, T]``."""
    require_supported_dtype(hidden, weight, bias)
    return TritonLinearTokenLogprobs.apply(hidden, weight, bias, labels, opts)


def linear_token_logprobs_and_kl(hidden, weight, bias, ref: LinearHead, labels, opts: TokenOptions):
    """Policy head plus reference head -> ``(logp, ref_logp, kl)``; the reference receives no gradient."""
    require_supported_dtype(hidden, weight, bias, ref.hidden, ref.weight, ref.bias)
    ref = LinearHead(ref.hidden.detach(), ref.weight.detach(), None if ref.bias is None else ref.bias.detach())
    return TritonLinearTokenLogprobsAndKL.apply(hidden, weight, bias, labels, ref, opts)
