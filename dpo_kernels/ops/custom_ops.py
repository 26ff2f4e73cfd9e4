"""What the package's two ``torch.library`` custom ops share: the options as op arguments, static-shape outputs,
and clear refusals while Dynamo traces.

The ops themselves sit beside their loops: ``dpo_kernels::logits_stats`` in :mod:`dpo_kernels.ops.logits_path`,
``dpo_kernels::linear_stats`` in :mod:`dpo_kernels.ops.linear.recompute`. Each is the path's one autograd
definition in eager mode and under ``torch.compile`` alike: to the compiler one opaque node with static output
shapes, and the same kernels either way, so compiled and eager results agree to the last bit.

Every :class:`~dpo_kernels.options.TokenOptions` field is an argument of every op, in the dataclass's order, its
schema type read from the field's annotation: a new option reaches the kernels with no edit here (a type the schema
cannot carry fails at import), and ``tests/test_compile.py`` checks that eager and compiled calls hand the kernels
equal options.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn

import torch
from torch import Tensor

from ..options import TOKEN_OPTION_FIELDS, TokenOptions

EMPTY = (0,)
DOUBLE_BACKWARD = ("dpo_kernels: the fused kernels have no double backward (create_graph=True); compute the gradient "
                   "without create_graph, or use backend='reference' (full logits, for small inputs) for higher-order "
                   "gradients")


@torch.library.custom_op("dpo_kernels::refuse", mutates_args=(), schema="(Tensor anchor, str message) -> Tensor")
def _refuse(anchor: Tensor, message: str) -> Tensor:
    raise ValueError(message)


@_refuse.register_fake
def _(anchor, message):
    raise ValueError(message)


def raise_value_error(message: str, anchor: Tensor) -> NoReturn:
    """``raise ValueError(message)``; while Dynamo traces, through an op whose fake kernel raises it, so that the
    message heads Dynamo's explanation (a plain ``raise`` in traced code becomes an "Observed exception" with the
    message at the end of the debug context). ``anchor``: any tensor of the call."""
    if torch.compiler.is_compiling():
        _refuse(anchor, message)
    raise ValueError(message)


def refuse_under_compile(anchor: Tensor, **features: object) -> None:
    """A clear error for the options the compiled path does not take."""
    used = [name for name, value in features.items() if value]
    if used:
        raise_value_error(f"{', '.join(used)} cannot be used under torch.compile; call dpo_kernels outside the "
                          "compiled region for it", anchor)


def refuse_double_backward() -> None:
    """Called first in an op's backward: the hand-written backwards are not themselves differentiable, so a double
    backward (``create_graph=True``: the engine then enables grad mode) is refused with a clear message."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)


_SCHEMA_TYPES = {"int": "int", "float": "float", "bool": "bool", "float | None": "float?", "int | None": "int?"}
_OPTIONS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in dataclasses.fields(TokenOptions))


def schema(tensors: str, outputs: str) -> str:
    """An op schema: its own arguments, then every option."""
    return f"({tensors}, {_OPTIONS_SCHEMA}) -> {outputs}"


def options_args(opts: TokenOptions) -> tuple:
    return tuple(getattr(opts, name) for name in TOKEN_OPTION_FIELDS)


def split_args(args: tuple, leading: int) -> tuple[tuple, TokenOptions]:
    """An op's positional arguments -> (its ``leading`` own arguments, the options)."""
    return args[:leading], TokenOptions(**dict(zip(TOKEN_OPTION_FIELDS, args[leading:], strict=True)))


def empty_or(x: Tensor | None, like: Tensor) -> Tensor:
    """``x``, or an empty stand-in for an output the call does not have."""
    return like.new_empty(EMPTY) if x is None else x


def present(x: Tensor) -> Tensor | None:
    """The inverse of :func:`empty_or` for a per-token output (never empty when present: it has a token per label)."""
    return None if x.dim() == 1 and x.numel() == 0 else x


def dtypes(*tensors: Tensor | None) -> tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in tensors if t is not None)
