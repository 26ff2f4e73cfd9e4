"""Launch configurations of the Triton kernels: heuristics from ``V``, ``D`` and dtype, and an opt-in autotuner.

The heuristics are the defaults. ``DPO_KERNELS_AUTOTUNE=1`` (or :func:`set_autotune`) makes the linear kernels time
a few candidate configurations once per shape key on the GPU and keep the fastest; it needs a CUDA device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

_AUTOTUNE = os.environ.get("DPO_KERNELS_AUTOTUNE", "0") == "1"


def set_autotune(enabled: bool) -> None:
    """Turn the autotuner of the linear kernels on or off for this process."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def autotune_enabled() -> bool:
    return _AUTOTUNE


@dataclass(frozen=True)
class RowConfig:
    """From-logits kernels: one program per token, ``BLOCK_V`` vocabulary entries per step."""

    block_v: int
    num_warps: int


@dataclass(frozen=True)
class TileConfig:
    """Linear kernels: ``BLOCK_N`` tokens x ``BLOCK_V`` vocabulary entries per tile, ``BLOCK_D`` per dot step."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


def row_config(vocab: int, dtype: torch.dtype, with_reference: bool) -> RowConfig:
    """Wide enough for few loop steps and 16-byte loads, narrow enough to keep two rows (KL) in registers."""
    cap = 4096 if dtype == torch.float32 or with_reference else 8192
    block_v = max(16, min(triton.next_power_of_2(vocab), cap))
    # two rows live at once with a reference: twice the threads for the same block
    per_warp = 256 if with_reference else 512
    return RowConfig(block_v=block_v, num_warps=max(1, min(16, block_v // per_warp)))


def tile_config(hidden: int, dtype: torch.dtype, with_reference: bool, backward: bool) -> TileConfig:
    """Tiles sized so the fp32 tiles alive at once (logits, softmax, gradient; twice with a reference) fit in
    registers: ``python -m dpo_kernels.tools.compile_check`` verifies that none of these spills on sm_80 / sm_90."""
    block_d = 32 if dtype == torch.float32 else 64
    block_d = max(16, min(block_d, triton.next_power_of_2(hidden)))
    if backward:
        fp32 = dtype == torch.float32
        block_n = 32 if with_reference or fp32 else 64
        # fp32 products are FMA loops (no tensor cores); at 8 warps ptxas caps them at 128 registers and spills
        warps = 16 if fp32 and not with_reference else 8
        return TileConfig(block_n=block_n, block_v=64, block_d=block_d, num_warps=warps, num_stages=2)
    return TileConfig(block_n=32 if with_reference else 64, block_v=64, block_d=block_d, num_warps=8, num_stages=3)


def tile_candidates(base: TileConfig) -> list[TileConfig]:
    """What the autotuner tries besides the heuristic choice."""
    out = [base]
    for bn, bv, warps in ((32, 64, 8), (64, 64, 8), (64, 128, 8), (128, 64, 8), (64, 64, 16)):
        cand = TileConfig(bn, bv, base.block_d, warps, base.num_stages)
        if cand not in out:
            out.append(cand)
    return out
