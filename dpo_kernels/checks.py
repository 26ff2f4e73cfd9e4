"""The checks every public entry runs on its inputs before any kernel: shapes, dtypes, devices, the label range
(the one host read of :mod:`dpo_kernels.host_read`), and a vocabulary split over a process group (a DTensor head, the
same inputs on every rank). A bad input gets an error naming the argument and what was expected.

Used by :mod:`dpo_kernels.primitives`, :func:`dpo_kernels.fused_dpo_loss` and the TRL head; the dispatch that
follows them is :mod:`dpo_kernels.ops.dispatch`.
"""

from __future__ import annotations

import torch

from .host_read import LabelFacts, read_label_facts
from .ops import vocab_parallel
from .ops.vocab_parallel import VocabSlice
from .options import TokenOptions
from .validation import (
    require_float,
    require_labels,
    require_labels_in_vocab,
    require_positive,
    require_same_device,
    require_shape,
)

# The linear path's schedules of a trainable head: fused_dpo_loss's (ops/linear/eager.py) and the per-token
# functions' (ops/linear/stored.py)
SCHEDULES = ("auto", "eager", "recompute")


def check_schedule(schedule: object, eager_budget_mb: object) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if eager_budget_mb is not None:
        require_positive("eager_budget_mb", eager_budget_mb)


def check_logits(name: str, logits: object, labels: object) -> None:
    """``logits [..., T, V]`` float, matching integer ``labels [..., T]`` on the same device."""
    logits = require_float(name, logits)
    labels = require_labels("labels", labels)
    if logits.dim() != labels.dim() + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{name} must have shape [..., T, V] matching labels [..., T]; got {name} {list(logits.shape)} "
            f"and labels {list(labels.shape)}"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension of at least 1, got {list(logits.shape)}")
    require_same_device(**{name: logits, "labels": labels})


def check_head(hidden: tuple[str, object], weight: tuple[str, object], bias: tuple[str, object], labels) -> None:
    """``hidden [..., T, D]``, ``weight [V, D]``, ``bias [V]`` or ``None``: float tensors on one device, matching
    labels. Their dtypes may differ (what autocast hands an fp32 head): the product's dtype follows
    :func:`dpo_kernels.ops.linear.products.product_dtype`."""
    (h_name, h), (w_name, w), (b_name, b) = hidden, weight, bias
    h, w = require_float(h_name, h), require_float(w_name, w)
    labels = require_labels("labels", labels)
    if w.dim() != 2:
        raise ValueError(f"{w_name} must be a 2-D head weight [V, D], got shape {list(w.shape)}")
    if h.dim() != labels.dim() + 1 or tuple(h.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{h_name} must have shape [..., T, D] matching labels [..., T]; got {h_name} {list(h.shape)} "
            f"and labels {list(labels.shape)}"
        )
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"{w_name} must have shape [V, {h.shape[-1]}] to match {h_name}, got {list(w.shape)}")
    if b is not None:
        require_float(b_name, b)
        require_shape(b_name, b, (w.shape[0],), f"one entry per row of {w_name}")
    require_same_device(**{h_name: h, w_name: w, b_name: b, "labels": labels})


def check_agree(**tensors: torch.Tensor | None) -> None:
    """The policy and reference tensors are on one device (their dtypes may differ: a bf16 reference model beside an
    fp32 policy)."""
    require_same_device(**tensors)


def check_label_range(labels: torch.Tensor, vocab: int, opts: TokenOptions, name: str = "labels", *,
                      counts: bool = False, per_row: bool = False, first_column: bool = False) -> LabelFacts | None:
    """Every label is ``ignore_index`` or in ``[0, vocab)``, unless ``opts.check_labels`` is off; returns the labels'
    :class:`~dpo_kernels.host_read.LabelFacts` from the same one host read, or ``None`` (under ``torch.compile``, or
    when the check is off and the caller wants no ``counts``: then nothing is read)."""
    if opts.check_labels:
        return require_labels_in_vocab(labels, vocab, opts.ignore_index, name, per_row=per_row,
                                       first_column=first_column)
    if not (counts or per_row or first_column) or torch.compiler.is_compiling():
        return None
    return read_label_facts(labels, opts.ignore_index, per_row=per_row, first_column=first_column)


# --------------------------------------------------------------------------------------------- vocabulary parallel


def local_head(weight, bias, group, labels):
    """``(weight, bias, group)`` with a DTensor head (sharded on dim 0) replaced by this rank's slice and its mesh's
    group; plain tensors pass through with ``group``."""
    found = None if weight is None else vocab_parallel.dtensor_vocab_slice(weight)
    if found is None:
        return weight, bias, group
    local, mesh_group = found
    if group is not None and group is not mesh_group:
        raise ValueError("the head is a DTensor sharded over its mesh's group; vocab_parallel_group must be that group "
                         "or None")
    if bias is not None:
        found_bias = vocab_parallel.dtensor_vocab_slice(bias)
        bias = bias if found_bias is None else found_bias[0]
    return local, bias, mesh_group


def vocab_slice_of(group, local_vocab: int, device: torch.device) -> VocabSlice | None:
    """This rank's slice of a vocabulary split over ``group`` (``None`` without a group)."""
    return None if group is None else vocab_parallel.vocab_slice(local_vocab, group, device)


def check_same_on_every_rank(vocab_slice: VocabSlice | None, opts: TokenOptions, labels: torch.Tensor,
                             *hidden: torch.Tensor | None) -> None:
    """Under a vocabulary-parallel group, every rank holds the same labels and hidden states (one tiny all-reduce,
    see :func:`vocab_parallel.require_same_inputs`); skipped without a group and with ``check_labels=False``."""
    if vocab_slice is not None and opts.check_labels:
        vocab_parallel.require_same_inputs(vocab_slice.group, labels, *hidden)


def total_vocab(vocab_slice: VocabSlice | None, local_vocab: int) -> int:
    return local_vocab if vocab_slice is None else vocab_slice.total
