"""Launch configurations of the Triton kernels, from the row width and dtype.

Every Triton kernel here is memory-bound (the head's products are cuBLAS GEMMs), so a configuration only has to keep
enough bytes in flight without spilling: ``python -m dpo_kernels.tools.compile_check`` verifies that none of these
spills on sm_80 / sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class RowConfig:
    """``BLOCK_V`` vocabulary entries per step of a program, ``num_warps`` warps per program."""

    block_v: int
    num_warps: int


def row_config(vocab: int, with_reference: bool) -> RowConfig:
    """From-logits kernels, one program per token: wide enough for few loop steps and 16-byte loads, narrow enough
    to keep a row's values and their per-lane partial sums in registers: 8 values a thread, 4 a row with a reference
    (two rows and three lane sums live at once). Wider (8 values a row with a KL at 8 warps, 16 for bf16/fp16
    log-probs at 8192) spilled 8-36 bytes under Triton 3.6 on sm_90, where ptxas aims at 48-64 registers; 4096 /
    2048 at 16 warps do not, under 3.6 nor 3.9."""
    cap = 2048 if with_reference else 4096
    block_v = max(16, min(triton.next_power_of_2(vocab), cap))
    per_warp = 128 if with_reference else 256
    return RowConfig(block_v=block_v, num_warps=max(1, min(16, block_v // per_warp)))


GRAD_BLOCKS = (1024, 512, 256)  # the gradient kernel's column blocks, widest first


def tile_row_config(width: int, elementwise: bool = False, with_reference: bool = False) -> RowConfig:
    """Tile kernels over fp32 tiles of ``width`` columns: the fold walks a token's row in ``BLOCK_V`` steps, 8 fp32
    values per thread (two 16-byte loads), 4 per row with a reference or with a frozen head's shifted weights (their
    loop carries the shifts and writes the weights); the gradient kernel gives each program one ``BLOCK_V`` column
    block, 4 values per thread and tensor (one 16-byte load), the widest of :data:`GRAD_BLOCKS` that leaves at most
    1/16 of its lanes idle over the row (else the one that leaves fewest): the plan's chunks are multiples of 256
    columns, so a 2560-wide tile takes 512-wide blocks instead of three 1024-wide ones with a sixth of the lanes idle.
    (16 values per thread spilled the fold with a bias on sm_90; under Triton 3.6, 8 per thread spilled the fold with
    a KL and the filtered gradient on sm_80, where ptxas aims at 40-64 registers. The shifted fold with a KL keeps
    one value across its row loop in local memory under Triton 3.6 at 1, 2 or 4 values per thread alike: outside
    the loop, one store and one load per row.)"""
    if not elementwise:
        block_v = max(16, min(triton.next_power_of_2(width), 1024 if with_reference else 2048))
    elif width <= GRAD_BLOCKS[-1]:
        block_v = max(16, triton.next_power_of_2(width))
    else:
        def idle(block: int) -> int:
            return -(-width // block) * block - width

        block_v = next((b for b in GRAD_BLOCKS if 16 * idle(b) <= width), min(GRAD_BLOCKS, key=idle))
    per_warp = 128 if with_reference or elementwise else 256
    return RowConfig(block_v=block_v, num_warps=max(1, block_v // per_warp))
