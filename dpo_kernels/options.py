"""Options shared by every per-token primitive and every backend.

One frozen dataclass travels from the public functions to the backends, so that no backend takes a long list of
positional arguments and adding an option touches one place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from .validation import is_finite_number, is_positive_finite


@dataclass(frozen=True)
class TokenOptions:
    """How logits become log-probabilities (MATH.md §1) and how the chunked backend tiles the work.

    Attributes:
        ignore_index: label value of positions that contribute 0 and receive 0 gradient.
        temperature: logits are divided by it after scaling and softcapping; must be > 0.
        softcap: when set, ``z = softcap * tanh(z / softcap)`` after scaling (Gemma 2 style); must be > 0.
        logit_scale: logits are multiplied by it first (Cohere/Granite style); must be finite and non-zero.
        token_chunk_size: tokens per tile (from logits: the ``torch`` backend's rows per step; from hidden states:
            tokens per block of the linear path, every backend); ``None`` picks one.
        vocab_chunk_size: vocabulary entries per tile of the linear path (every backend); ``None`` picks one.
        tile_budget_mb: scratch memory, in MiB, of the linear path's tiles (logits, reference logits and their
            gradient; from logits, the torch backend's fp32 tiles): the tile sizes come from it unless given
            above. ``None``: the device's default, stated in ``ops/linear/plan.py``.
        inplace_backward: from logits only: write the logits' gradient into their own storage (see ``ops.inplace``).
        grad_filter_eps: from hidden states only: skip a backward tile whose every ``|softmax - onehot|`` (and
            ``|softmax - q|`` for the KL) is below it; ``None`` (default) computes exact gradients. Whether to skip
            a tile's two GEMMs is decided on the host, so on a GPU each backward tile waits for its gradient kernel
            (one host sync per tile). It rarely pays at the tile sizes of the plan: measured on the CPU (2048
            tokens, V = 32000, a mix of diffuse and near-certain tokens with a mean entropy of 2.7 nats), no tile
            was skipped at eps = 1e-3, with token blocks of 2048, 256 or 16; only a batch where every token is
            near-certain (entropy 0.00) skipped them, where the gradient is nearly zero anyway.
        check_labels: check that every label is ``ignore_index`` or a vocabulary id before any kernel runs (one
            reduction and a host sync; under ``torch.compile`` an in-graph asynchronous assert instead); ``False``
            skips it, and an out-of-range label is then undefined behaviour.
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
    token_chunk_size: int | None = None
    vocab_chunk_size: int | None = None
    tile_budget_mb: float | None = None
    inplace_backward: bool = False
    grad_filter_eps: float | None = None
    check_labels: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not is_positive_finite(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.softcap is not None and not is_positive_finite(self.softcap):
            raise ValueError(f"softcap must be None or a finite number > 0, got {self.softcap!r}")
        if not is_finite_number(self.logit_scale) or self.logit_scale == 0:
            raise ValueError(f"logit_scale must be a finite non-zero number, got {self.logit_scale!r}")
        for name in ("token_chunk_size", "vocab_chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if self.tile_budget_mb is not None and not is_positive_finite(self.tile_budget_mb):
            raise ValueError(f"tile_budget_mb must be None or a finite number of MiB > 0, got {self.tile_budget_mb!r}")
        for name in ("inplace_backward", "check_labels"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.grad_filter_eps is not None and not (is_finite_number(self.grad_filter_eps) and self.grad_filter_eps >= 0):
            raise ValueError(f"grad_filter_eps must be None or a finite number >= 0, got {self.grad_filter_eps!r}")

    @property
    def is_identity_transform(self) -> bool:
        """True when logits are used as given (no scale, softcap or temperature)."""
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0


# TokenOptions' field names in order, for code that maps them to and from arguments of the same names (named at import:
# Dynamo cannot call dataclasses.fields while tracing)
TOKEN_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(TokenOptions))


def option_keywords(*declarations: type, only: Collection[str] | None = None) -> Callable:
    """Decorates a function taking ``**options``: its signature gets one keyword-only parameter per field of the
    ``declarations`` (dataclasses; with ``only``, just those fields), with the field's default and annotation, so that
    an option is declared once, in its dataclass, and every public function taking it shows it as a keyword
    (``help()``, ``inspect.signature``, IDEs that read signatures). A keyword that is not one of them is refused
    with Python's own ``TypeError``. The function receives the options given, and builds its dataclass from them
    (whose defaults fill the rest)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        added = []
        for declaration in declarations:
            for f in dataclasses.fields(declaration):
                if f.init and f.name not in taken and (only is None or f.name in only):
                    added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                                   annotation=f.type))
                    taken.add(f.name)
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for name in kwargs:
                if name not in taken:  # the function's own parameters and the options
                    raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {name!r}")
            return fn(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*positional, *keyword, *added])
        return wrapper

    return decorate


def statistics_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the statistics are computed and returned in, for inputs of ``dtypes``: fp32, or fp64 when any input
    is fp64 (the policy and the reference, or hidden states and head, may differ)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
