"""The ``triton`` backend: Triton kernels for the primitives (GPU; on the CPU under ``TRITON_INTERPRET=1``).

``logits.py`` holds the from-logits kernels, ``tiles.py`` the tile kernels of the linear path (whose products are
cuBLAS GEMMs, see :mod:`dpo_kernels.ops.linear`), ``config.py`` the launch heuristics, ``jit_helpers.py`` the device
functions they share. Inputs are fp16, bf16 or fp32; statistics are fp32. This module exposes the backend interface
of ``dpo_kernels.ops.registry``.
"""

from __future__ import annotations

import torch

from ...options import TokenOptions
from ..common import LinearHead
from ..linear import driver
from ..linear.contract import TileKernels
from .launch import require_supported_dtype
from .logits import TritonTokenLogprobs, TritonTokenLogprobsAndKL
from .tiles import fold_tile, grad_tile

TILE_KERNELS = TileKernels(fold=fold_tile, grad=grad_tile)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
    """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
    require_supported_dtype(logits)
    return TritonTokenLogprobs.apply(logits, labels, opts)


def token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions):
    """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
    require_supported_dtype(logits, ref_logits)
    return TritonTokenLogprobsAndKL.apply(logits, labels, ref_logits.detach(), opts)


def linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions,
                       logging: bool = False, head_context=None):
    """The linear path on the Triton tile kernels (see :mod:`dpo_kernels.ops.linear.driver`)."""
    heads = (policy,) if ref is None else (policy, ref)
    require_supported_dtype(*(t for head in heads for t in (head.hidden, head.weight, head.bias)))
    return driver.linear_token_stats(policy, ref, labels, opts, TILE_KERNELS, logging, head_context=head_context)
