"""Checks run before any kernel launches. Every message names the argument and says what was expected."""

from __future__ import annotations

import torch

from .host_read import LabelFacts, read_label_facts

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, t: object) -> torch.Tensor:
    t = require_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def require_labels(name: str, t: object) -> torch.Tensor:
    t = require_tensor(name, t)
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids (e.g. torch.long), got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., T], got a scalar")
    return t


def require_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def require_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(t.shape)}")


def require_labels_in_vocab(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels", *,
                            per_row: bool = False, first_column: bool = False) -> LabelFacts | None:
    """Every label is ``ignore_index`` or in ``[0, vocab)``; returns the labels' :class:`LabelFacts` (kept counts),
    read in the same one host read (:mod:`dpo_kernels.host_read`). Under ``torch.compile`` the check is an
    asynchronous assert inside the graph instead and nothing is read (``None``; on a GPU a failure surfaces as a
    device-side assert at the next synchronisation, without the offending value)."""
    if torch.compiler.is_compiling():
        if labels.numel():
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
            torch._assert_async(~bad.any(), f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}")
        return None
    facts = read_label_facts(labels, ignore_index, vocab, per_row=per_row, first_column=first_column)
    if facts.bad:  # the error path reads again, for the message
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({facts.bad} bad position(s))"
        )
    return facts


def is_finite_number(x: object) -> bool:
    """A Python (or, under ``torch.compile(dynamic=True)``, symbolic) int or float that is neither inf nor NaN.

    Written as two comparisons, not ``math.isfinite``: Dynamo cannot trace ``math.isfinite`` on a symbolic float
    (``dynamic=True`` makes float arguments symbolic), while a comparison becomes a guard."""
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.SymInt, torch.SymFloat)):
        return False
    return bool(-_INF < x < _INF)


def is_positive_finite(x: object) -> bool:
    return is_finite_number(x) and bool(x > 0)


_INF = float("inf")


def require_positive(name: str, value: object) -> float:
    if not is_positive_finite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value
