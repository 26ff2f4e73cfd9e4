"""Tile sizes of the linear path, from one memory budget.

A tile is ``tokens x vocab`` logits. Everything the driver allocates per tile (the fp32 logits tile, the reference
tile, the ``dZ`` tile in the GEMM operand dtype) counts against ``tile_budget_mb``; the default keeps the scratch
small next to what a training step already holds (the head's weight gradient is ``V x D``). This module is the one
place that states the defaults (the docstrings elsewhere point here):

- CPU: 16 MiB, so a tile stays near the last-level cache between the GEMM that writes it and the kernel that folds it;
- accelerators: 128 MiB. At N = 8192 tokens in bf16 that is a full-height tile of about 2.5k vocabulary columns in
  the backward (fp32 logits + bf16 ``dZ``, 6 bytes per entry): GEMMs of ``8192 x 2560 x D``, large enough for the
  tensor cores, and 51 vocabulary chunks for a 128k vocabulary.

All tokens go in one block whenever a tile of ``MIN_VOCAB_CHUNK`` columns fits the budget (then the backward writes
each vocabulary chunk's weight gradient with one GEMM); otherwise tokens are split into blocks of
``budget / (MIN_VOCAB_CHUNK x bytes)``. ``token_chunk_size`` / ``vocab_chunk_size`` override either size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...options import TokenOptions

DEFAULT_TILE_BUDGET_MB = {"cpu": 16.0}
ACCELERATOR_TILE_BUDGET_MB = 128.0
MIN_VOCAB_CHUNK = 1024
VOCAB_ALIGN = 256  # vocabulary chunks are multiples of this when wider (aligned rows, whole GEMM tiles)


def default_tile_budget_mb(device: torch.device) -> float:
    return DEFAULT_TILE_BUDGET_MB.get(device.type, ACCELERATOR_TILE_BUDGET_MB)


def tile_budget_bytes(opts: TokenOptions, device: torch.device) -> int:
    """The one tile budget, in bytes: ``opts.tile_budget_mb``, else the device's default; the linear path's tiles and
    the torch backend's from-logits tiles are sized from it."""
    return int((opts.tile_budget_mb or default_tile_budget_mb(device)) * 2**20)


DEFAULTS_TEXT = f"{DEFAULT_TILE_BUDGET_MB['cpu']:g} MiB on CPU, {ACCELERATOR_TILE_BUDGET_MB:g} on accelerators"

# The eager schedule's budget (dpo_kernels.ops.linear.eager): the kept fp32 tiles of a group of pairs, 4 V bytes per
# kept token (8 V for TDPO), plus the fp32 weight-gradient accumulator of a half weight over several groups. On an
# accelerator 2 GiB holds about 4k tokens of a 128k vocabulary (8k for 64k); on the CPU, 1 GiB.
DEFAULT_EAGER_BUDGET_MB = {"cpu": 1024.0}
ACCELERATOR_EAGER_BUDGET_MB = 2048.0
EAGER_DEFAULTS_TEXT = (f"{DEFAULT_EAGER_BUDGET_MB['cpu']:g} MiB on CPU, {ACCELERATOR_EAGER_BUDGET_MB:g} on "
                       "accelerators")


def eager_budget_bytes(budget_mb: float | None, device: torch.device) -> int:
    """The eager schedule's budget in bytes: ``budget_mb``, else the device's default."""
    return int((budget_mb or DEFAULT_EAGER_BUDGET_MB.get(device.type, ACCELERATOR_EAGER_BUDGET_MB)) * 2**20)


@dataclass(frozen=True)
class TilePlan:
    """``tokens`` per token block, ``vocab`` columns per vocabulary chunk."""

    tokens: int
    vocab: int

    def token_blocks(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.tokens):
            yield start, min(n, start + self.tokens)

    def vocab_chunks(self, v: int) -> Iterator[tuple[int, int]]:
        for start in range(0, v, self.vocab):
            yield start, min(v, start + self.vocab)

    def single_token_block(self, n: int) -> bool:
        return n <= self.tokens


def plan_tiles(n: int, vocab: int, bytes_per_entry: int, opts: TokenOptions, device: torch.device) -> TilePlan:
    """Tile sizes for ``n`` tokens and a ``vocab``-wide head, with ``bytes_per_entry`` of scratch per logit."""
    entries = max(1, tile_budget_bytes(opts, device) // bytes_per_entry)
    n = max(n, 1)
    narrowest = min(vocab, MIN_VOCAB_CHUNK)
    if opts.token_chunk_size is not None:
        tokens = min(n, opts.token_chunk_size)
    elif n * narrowest <= entries:
        tokens = n
    else:
        tokens = max(1, entries // narrowest)
    if opts.vocab_chunk_size is not None:
        width = opts.vocab_chunk_size
    else:
        width = max(1, entries // tokens)
        if width > VOCAB_ALIGN:
            width -= width % VOCAB_ALIGN
    return TilePlan(tokens=tokens, vocab=max(1, min(vocab, width)))
