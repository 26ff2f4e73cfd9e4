"""The one host read of a fused call: what the host must know about the labels before the first kernel, read from
the device in one copy.

A fused call needs three facts about its labels on the host: whether every label is ``ignore_index`` or a vocabulary
id (the label check, an error before any kernel), how many tokens each row keeps (the eager schedule's pair groups,
the shapes of the kept rows), and for ``fused_dpo_loss`` with ``shift=False`` whether a first position is scored
(the unshifted-labels warning). Each read on its own is a device-to-host copy and, on a GPU, a synchronisation that
drains the stream; :func:`read_label_facts` reduces them on the device and copies them in one ``tolist()``. The
kept rows are then gathered with ``torch.nonzero_static`` at the known count
(:class:`dpo_kernels.ops.linear.kept.KeptTokens`), which needs no second read.

Not used under ``torch.compile`` (a host read is a graph break there; the label check is an asynchronous assert and
the compiled ops find their kept rows themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabelFacts:
    """``kept_per_row``: kept tokens of each row of ``labels [R, T]`` (``None`` when only the total was asked for);
    ``kept``: their total; ``bad``: labels neither ``ignore_index`` nor in ``[0, vocab)`` (0 when unchecked);
    ``first_scored``: whether some ``labels[:, 0]`` is kept (``False`` when not asked)."""

    kept: int
    kept_per_row: tuple[int, ...] | None = None
    bad: int = 0
    first_scored: bool = False


def read_label_facts(labels: torch.Tensor, ignore_index: int, vocab: int | None = None, *, per_row: bool = False,
                     first_column: bool = False) -> LabelFacts:
    """The facts of ``labels [..., T]`` (rows: every leading dimension) in one device-to-host copy. ``vocab``:
    count the labels outside ``[0, vocab)`` that are not ``ignore_index`` (``None``: no range check)."""
    kept_mask = labels != ignore_index
    # rows given by count, not -1: a [R, 0] tensor has no size to infer it from
    if labels.dim():
        rows = kept_mask.reshape(math.prod(labels.shape[:-1]), labels.shape[-1])
    else:
        rows = kept_mask.reshape(1, 1)
    per_row_counts = rows.sum(dim=1)
    parts = [per_row_counts if per_row else per_row_counts.sum().reshape(1)]
    if vocab is not None:
        parts.append((kept_mask & ((labels < 0) | (labels >= vocab))).sum().reshape(1))
    if first_column:  # (no column: nothing is scored)
        parts.append(rows[:, :1].any().reshape(1).long())
    values = torch.cat([p.long() for p in parts]).tolist()  # the one host read
    counts = values[: rows.shape[0]] if per_row else values[:1]
    rest = values[len(counts):]
    bad = rest.pop(0) if vocab is not None else 0
    first = bool(rest.pop(0)) if first_column else False
    return LabelFacts(kept=sum(counts), kept_per_row=tuple(counts) if per_row else None, bad=bad, first_scored=first)
