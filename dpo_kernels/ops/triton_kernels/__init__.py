"""The ``triton`` backend: Triton kernels for the primitives (GPU; on the CPU under ``TRITON_INTERPRET=1``).

``logits.py`` holds the from-logits kernels, ``tiles.py`` the tile kernels of the linear path (whose products are
cuBLAS GEMMs, see :mod:`dpo_kernels.ops.linear`), ``config.py`` the launch heuristics, ``jit_helpers.py`` the device
functions they share. Inputs are fp16, bf16 or fp32; statistics are fp32. :data:`KERNELS` is the backend's
description (:mod:`dpo_kernels.ops.backend`).
"""

from __future__ import annotations

from ..backend import BackendKernels
from ..linear.contract import TileKernels
from ..logits_path import LogitsKernels
from .launch import require_supported_dtype
from .logits import logits_backward, logits_fold, logits_forward
from .tiles import fold_shifted, fold_tile, fold_tile_weights, grad_tile, scaled_grad

KERNELS = BackendKernels(logits=LogitsKernels(forward=logits_forward, backward=logits_backward, fold=logits_fold),
                         tiles=TileKernels(fold=fold_tile, grad=grad_tile, fold_weights=fold_tile_weights,
                                           scaled_grad=scaled_grad, fold_shifted=fold_shifted),
                         check=require_supported_dtype)
