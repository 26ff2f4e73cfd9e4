"""Vocabulary-parallel heads: each rank of a process group holds a contiguous slice of the vocabulary.

Rank ``r`` of ``R`` holds columns ``[v_r, v_{r+1})`` of the head (``weight [V_r, D]``, ``bias [V_r]``) or of the
logits (``[..., V_r]``), slices in rank order, sizes free; every rank holds the same tokens and the same (global)
labels. Each rank folds its slice into the per-token statistics of :mod:`dpo_kernels.ops.linear.contract` with its
own backend's tile kernels, then :func:`combine` merges them across the group (MATH.md §7):

    M = max_r m_r,   S = sum_r s_r e^{m_r - M},   label logit = sum_r (the owner's, 0 elsewhere)
    reference: Mr, Sr likewise, and w = sum_r w_r e^{mr_r - Mr}

so every rank ends with the statistics one process with the whole head would have, and the same outputs. In the
backward each rank forms ``dZ`` on its own slice from the global ``lse``; its weight and bias gradients are its own;
the hidden-state gradient ``dH = sum_r dZ_r W_r`` is all-reduced inside the backward (see
:func:`all_reduce_hidden_grad` for why).

Communication per kept token, with ring all-reduces of ``k`` fp32 values costing ``2 k (R-1)/R x 4`` bytes per rank:
forward 3 values (policy: max, then sum and label logit), 7 with a reference (+ its max, sum, label logit and
``w``), 4 more for the statistics trainers log; backward ``D`` values (``dH``, fp32). So the forward moves
``24 (R-1)/R`` bytes per token (56 with the KL) and the backward ``8 D (R-1)/R`` (32 KiB per token at D = 4096 on
many ranks): constant in ``R`` beyond a few ranks, while each rank's GEMM work falls as ``1/R``. Plus one all-gather
of the slice sizes per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .linear.contract import RefRow, StatRow, has_logging_rows


@dataclass(frozen=True)
class VocabSlice:
    """This rank's columns start at ``start`` in a ``total``-wide vocabulary split over ``group``; ``largest``: the
    widest rank's slice (the same number on every rank, for decisions every rank must take alike)."""

    group: object
    start: int
    total: int
    largest: int


def vocab_slice(local_vocab: int, group, device: torch.device) -> VocabSlice:
    """Every rank's slice size, gathered once: this rank's offset and the whole vocabulary."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=_collective_device(group, device))
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s.item()) for s in sizes]
    if min(sizes) < 1:
        raise ValueError(f"every rank of vocab_parallel_group must hold at least one vocabulary entry, got {sizes}")
    rank = dist.get_rank(group)
    return VocabSlice(group=group, start=sum(sizes[:rank]), total=sum(sizes), largest=max(sizes))


def _collective_device(group, device: torch.device) -> torch.device:
    """Tensors for a collective on ``group``: CUDA for NCCL, the inputs' device otherwise (gloo takes CPU and CUDA)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else device


def combine(stats: torch.Tensor, ref_stats: torch.Tensor | None, group) -> None:
    """Merge every rank's fold statistics in place (two all-reduces: MAX, then SUM); afterwards ``stats``
    (``[3, n]``, or ``[7, n]`` with the logging rows) and ``ref_stats`` (``[4, n]``) are the whole vocabulary's."""
    # (buffer, row) pairs in the order they travel: the maxima in one MAX all-reduce, then every sum, each rescaled
    # to the global maximum of its side, in one SUM all-reduce
    logging = has_logging_rows(stats)
    max_rows = [(stats, StatRow.MAX)] + ([(stats, StatRow.MAX_BEFORE_LABEL)] if logging else [])
    max_rows += [] if ref_stats is None else [(ref_stats, RefRow.MAX)]
    maxima = torch.stack([buffer[row] for buffer, row in max_rows])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    factor = _rescale(stats[StatRow.MAX], maxima[0])  # the policy's maximum travels first, the reference's last
    # each summed row with the power of its side's rescaling factor it needs (the squares scale twice)
    sum_rows = [(stats, StatRow.SUM, factor), (stats, StatRow.LABEL_LOGIT, None)]
    if logging:
        sum_rows += [(stats, StatRow.WEIGHTED_LOGITS, factor), (stats, StatRow.SQUARES, factor * factor),
                     (stats, StatRow.LOGIT_SUM, None)]
    if ref_stats is not None:
        ref_factor = _rescale(ref_stats[RefRow.MAX], maxima[-1])
        sum_rows += [(ref_stats, RefRow.SUM, ref_factor), (ref_stats, RefRow.LABEL_LOGIT, None),
                     (ref_stats, RefRow.WEIGHTED, ref_factor)]
    sums = torch.stack([buffer[row] if f is None else buffer[row] * f for buffer, row, f in sum_rows])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    for (buffer, row), value in zip(max_rows, maxima, strict=True):
        buffer[row] = value
    for (buffer, row, _), value in zip(sum_rows, sums, strict=True):
        buffer[row] = value


def _rescale(local_max: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """``e^{m_r - M}``, 0 for a rank whose slice held nothing finite (``m_r = -inf``)."""
    return torch.where(torch.isinf(local_max), torch.zeros_like(local_max), torch.exp(local_max - global_max))


def all_reduce_hidden_grad(dh: torch.Tensor, group) -> None:
    """``dH = sum_r dZ_r W_r`` over the group, in place (fp32).

    Inside the backward rather than left to the caller: the hidden states feed a backbone that every rank of the
    group holds whole (only the head is split), so every rank needs the full ``dH`` before its backbone's backward;
    doing it here makes the vocabulary-parallel primitives drop-in replacements with correct gradients, and one
    fp32 all-reduce of ``dH`` is the least communication that gives every rank the sum."""
    dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)


def dtensor_vocab_slice(weight: torch.Tensor):
    """``(local_weight, group)`` when ``weight`` is a DTensor sharded on dim 0 over a one-dimensional mesh (a
    vocabulary-parallel head), else ``None``. ``to_local`` keeps autograd: the gradient goes back to the shards."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return None
    placements = weight.placements
    if weight.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            "a DTensor head must be sharded on dim 0 (the vocabulary) over a one-dimensional mesh, got placements "
            f"{placements} on a {weight.device_mesh.ndim}-D mesh; pass weight.full_tensor() for a replicated head"
        )
    return weight.to_local(), weight.device_mesh.get_group()


def require_same_inputs(group, labels: torch.Tensor, *replicated: torch.Tensor | None) -> None:
    """Vocabulary parallelism splits the head, not the batch: every rank must hold the same labels and the same
    hidden states (``replicated``; logits slices differ by design and are not passed). A digest of each (a weighted
    sum of the labels, fp64 sums of the hidden states, every shape) goes through one tiny all-reduce and a host sync,
    so that a data-parallel group passed by mistake, or ranks fed different batches, fail here instead of giving the
    same wrong answer on every rank. Skipped with ``check_labels=False``."""
    flat = labels.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 1000003
    parts = [(flat * weights).sum(), flat.sum()]
    for t in replicated:
        if t is not None:  # the bits of an fp64 sum: equal inputs on equal devices give equal bits
            parts.append(t.detach().sum(dtype=torch.float64).reshape(1).view(torch.int64)[0].to(flat.device))
    shapes = [n for t in (labels, *replicated) if t is not None for n in t.shape]
    digest = torch.cat([torch.stack(parts), torch.tensor(shapes, dtype=torch.int64, device=flat.device)])
    both = torch.cat([digest, -digest]).to(_collective_device(group, labels.device))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # the largest digest and minus the smallest
    if not torch.equal(both[: digest.numel()], -both[digest.numel():]):
        raise ValueError(
            "vocab_parallel_group: the ranks hold different labels or hidden states, but vocabulary parallelism "
            "needs the same tokens on every rank (only the head is split). A head sharded for data parallelism "
            "(FSDP) must be gathered first, e.g. weight.full_tensor(); check_labels=False skips this check"
        )
