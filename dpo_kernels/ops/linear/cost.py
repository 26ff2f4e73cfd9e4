"""``schedule="auto"``'s estimate of what each schedule costs on an accelerator, so that it runs the eager schedule
only where that is estimated faster than the recompute schedule.

An estimate from peak rates (:mod:`.plan`: ``ACCELERATOR_FLOPS``, ``ACCELERATOR_BANDWIDTH``, ``LAUNCH_SECONDS``,
about what a roofline model fitted to H100 measurements gives), never a measurement: GEMM FLOPs at the tensor cores'
rate, plus every byte the schedule moves per logit and per head outside the GEMMs' main loops, plus kernel launches.
The terms (``n`` kept tokens, a ``[V, D]`` head, ``s`` bytes a kept logit, :func:`.plan.kept_store_dtype`):

- GEMMs: recompute ``2 n D V`` per pass (policy forward, recompute, ``dH``, ``dW``; the reference's forward, and for
  a KL gradient its recompute); eager the same without the recompute passes, but for the columns a scaled store
  larger than the budget does not keep.
- Per logit: an fp32 tile written by its GEMM and read by its fold (8 bytes) in each pass that computes it; ``dZ``
  written in the operand dtype and read by the ``dH`` and ``dW`` GEMMs (6 bytes). The eager schedule's scaled store
  writes the softmax weights in the fold's pass (``s``) and reads them once to form ``dZ`` (``s``, with the
  reference's for a KL; in the backward over one group, the forward's otherwise).
- Per head: a head converted to its GEMM operands (fp32 masters under autocast) costs 3 bytes per operand byte each
  time: once a pass for recompute; for eager over one group of a scaled store the reference's once and the
  policy's rows once where they are kept in the weight gradient's memory (``converted_held``: their share), the
  others twice (forward, backward); otherwise once a call when ``eager_budget_mb`` holds the copies, else every
  group converts the policy's head twice (fold, gradient) and the reference's once. The fp32 ``dH [n, D]`` is read
  and written by every vocabulary chunk's accumulation; an fp32 weight's gradient accumulated by the eager forward
  is scaled in place by its backward, and a half weight's fp32 accumulator over several groups is zeroed, scaled and
  rounded (over one group of a scaled store the backward writes either once, the scale inside ``dZ``).
- Launches: about 7 a vocabulary chunk for recompute (two passes), 9 a chunk and group for eager (6 when the
  backward forms every gradient: the policy's GEMM and fold at shifts, the reference's GEMM, then dZ, dW, dH), one more where the reference's tiles are folded alone (no KL wanted), 3 more
  where the heads are converted chunk by chunk (2 for the chunks whose converted rows a scaled store keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...options import TokenOptions
from .plan import (
    ACCELERATOR_BANDWIDTH,
    ACCELERATOR_FLOPS,
    LAUNCH_SECONDS,
    plan_tiles,
)

OPERAND_BYTES = 2  # the half GEMM operands a conversion writes and dZ is rounded to
CONVERSION_BYTES = 3  # per operand byte: an fp32 read and a half write


@dataclass(frozen=True)
class Estimate:
    """One schedule's estimated cost: GEMM FLOPs, bytes outside the GEMMs' main loops, launches, and the seconds
    they come to at the accelerator rates of :mod:`.plan`."""

    flops: float
    bytes: float
    launches: int

    @property
    def seconds(self) -> float:
        return self.flops / ACCELERATOR_FLOPS + self.bytes / ACCELERATOR_BANDWIDTH + self.launches * LAUNCH_SECONDS

    def __str__(self) -> str:
        return (f"{self.seconds * 1e3:.1f} ms ({self.flops / 1e12:.1f} TFLOP, {self.bytes / 1e9:.1f} GB, "
                f"{self.launches} launches)")


@dataclass(frozen=True)
class HeadFacts:
    """What the estimate needs of a call: ``n`` kept tokens, a ``vocab x dim`` head, whether a reference head is
    given and whether its KL needs a gradient (TDPO), bytes of the policy's and the reference's heads converted to
    GEMM operands for a pass (0: no conversion), a half or an fp32 trainable weight, and the statistics dtype's
    size."""

    n: int
    vocab: int
    dim: int
    with_ref: bool
    kl_grad: bool
    policy_converted: int
    ref_converted: int
    half_weight_grad: bool
    fp32_weight_grad: bool


def _chunks(tokens: int, vocab: int, dim: int, bytes_per_entry: int, opts: TokenOptions) -> int:
    plan = plan_tiles(tokens, vocab, bytes_per_entry, opts, torch.device("cuda"), dim=dim)
    return sum(1 for _ in plan.vocab_chunks(vocab))


def _ref_alone(facts: HeadFacts) -> int:
    """1 where the reference's tiles are folded alone (no KL wanted: :func:`.loop.fold_all`), a launch more a chunk."""
    return int(facts.with_ref and not facts.kl_grad)


def _forward_tile_bytes(facts: HeadFacts) -> int:
    """The forward's fp32 tile bytes a logit: the policy's and the reference's, one tile where they share it."""
    return 4 * (2 if facts.with_ref and facts.kl_grad else 1)


def recompute(facts: HeadFacts, opts: TokenOptions) -> Estimate:
    n, v, d = facts.n, facts.vocab, facts.dim
    logits = n * v
    ref_passes = (1 if facts.with_ref else 0) + (1 if facts.kl_grad else 0)
    flops = 2.0 * n * d * v * (4 + ref_passes)
    tiles = logits * (8 * (2 + ref_passes) + 6)
    conversions = CONVERSION_BYTES * (2 * facts.policy_converted + ref_passes * facts.ref_converted)
    forward_chunks = _chunks(n, v, d, _forward_tile_bytes(facts), opts)
    backward_chunks = _chunks(n, v, d, 4 * (2 if facts.kl_grad else 1) + OPERAND_BYTES, opts)
    dh = backward_chunks * 8 * n * d
    launches = (3 + _ref_alone(facts)) * forward_chunks + (5 if facts.kl_grad else 4) * backward_chunks
    return Estimate(flops, tiles + conversions + dh, launches)


def eager(facts: HeadFacts, opts: TokenOptions, group_tokens: tuple[int, ...], store_bytes: int,
          converted_held: float, kept: float = 1.0) -> Estimate:
    """``group_tokens``: each group's kept tokens; ``store_bytes``: bytes a kept logit (2 for the scaled store, 4 for
    fp32 tiles); ``converted_held``: 1 where the converted heads fit beside the tiles (converted once for the call),
    else 0; over one group of a scaled store, the share of the policy's converted rows it keeps;
    ``kept``: the share of the vocabulary a scaled store keeps (the rest recomputed by the backward, as the
    recompute schedule does)."""
    n, v, d = facts.n, facts.vocab, facts.dim
    logits, groups = n * v, len(group_tokens)
    scaled = store_bytes < 4
    kept_heads = 2 if facts.kl_grad else 1
    recomputed = 1.0 - kept  # the policy's tiles (and the reference's for a KL gradient) computed again
    flops = 2.0 * n * d * v * (3 + (1 if facts.with_ref else 0) + recomputed * kept_heads)
    per_logit = 8 * (2 if facts.with_ref else 1) + 6  # the forward's tiles, dZ
    per_logit += kept * store_bytes * kept_heads + recomputed * 8 * kept_heads  # kept logits read, or recomputed
    deferred = scaled and groups == 1  # the backward forms every gradient from the kept weights
    if scaled:
        per_logit += kept * store_bytes * kept_heads  # the weights written by the fold (the fp32 tiles are the GEMM's)
    conversions = facts.policy_converted + facts.ref_converted
    if deferred:
        conversions = (2 - converted_held) * facts.policy_converted + facts.ref_converted
        if facts.kl_grad:
            conversions += recomputed * facts.ref_converted
    elif not converted_held:
        conversions = groups * (2 * facts.policy_converted + facts.ref_converted)
    chunks = [_chunks(t, v, d, _forward_tile_bytes(facts) + OPERAND_BYTES, opts) for t in group_tokens]
    dh = sum(c * 8 * t * d for c, t in zip(chunks, group_tokens, strict=True))
    weight_grad = 0  # deferred: written once by the backward's GEMMs, the scale inside dZ
    if facts.fp32_weight_grad and not deferred:
        weight_grad = 8 * v * d  # scaled in place by the backward
    elif facts.half_weight_grad and groups > 1:
        weight_grad = (4 + 4 + OPERAND_BYTES) * v * d  # the fp32 accumulator zeroed, then scaled and rounded
    if groups > 1 and (facts.fp32_weight_grad or facts.half_weight_grad):
        weight_grad += groups * 8 * v * d  # each group's dW GEMMs read and write the fp32 accumulator
    per_chunk = ((6 if deferred else 9) + _ref_alone(facts) + recomputed * (1 + kept_heads)
                 + (0 if not facts.policy_converted or (converted_held and not deferred)
                    else 3 - converted_held))
    return Estimate(flops, logits * per_logit + CONVERSION_BYTES * conversions + dh + weight_grad,
                    round(per_chunk * sum(chunks)))
