"""The tile loop as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces a training step
around it.

Dynamo cannot trace the tile loop itself (its kernels are C++, CUDA or Triton launches, its plan depends on how many
tokens are kept, a host sync), so under compilation the primitives call these four ops instead of the autograd
functions of :mod:`driver`. To the compiler each op is one opaque node with static output shapes; it runs the same
:func:`driver.linear_forward` / :func:`driver.linear_backward` (or the ``logits_*`` pair) as eager mode, with the
backend's :class:`TileKernels`, so compiled and eager results agree to the last bit.

- ``dpo_kernels::linear_stats`` / ``linear_stats_backward``: from hidden states and a head (optionally a reference
  head): ``(logp [R, T], ref_logp [R, T], kl [R, T], lse [R*T], ref_lse [R*T])``, the reference outputs empty
  without a reference. ``lse`` is scattered to every token (0 where ignored) so its shape is static; the backward
  recomputes which tokens are kept from the labels.
- ``dpo_kernels::logits_stats`` / ``logits_stats_backward``: the same over given logits ``[R, T, V]``, on the
  backend's dedicated from-logits row kernels (:mod:`dpo_kernels.ops.logits_path`: one read of each logit forward,
  one read and one write backward, every token in place, so no shape depends on the data).

The products' dtype is decided before the op, under the caller's autocast state (``compute_dtype``), as the eager
path decides it. Not supported under compilation (each refused with a clear error): ``vocab_parallel_group``,
``inplace_backward``, a ``head_context`` and the logged statistics of the TRL patch.

CUDA graphs (``mode="reduce-overhead"``): the from-logits ops have no host sync and can be captured. The linear ops
cannot: they drop the ignored tokens before the first GEMM, and how many are kept is read on the host (``nonzero``,
before the plan of tiles can be made), which a stream capture does not allow; they raise saying so instead of
failing inside the capture.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn

import torch
from torch import Tensor

from ...options import TOKEN_OPTION_FIELDS, TokenOptions, statistics_dtype
from ..backend import BackendKernels
from .. import logits_path
from ..common import LinearHead
from ..logits_path import LogitsKernels
from ..registry import resolve_backend
from . import driver
from .contract import TileKernels
from .products import product_dtype

_EMPTY = (0,)


def _backend_kernels(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> BackendKernels:
    """Every kernel of ``backend`` for these inputs; the single-process oracle has none."""
    name, impl = resolve_backend(backend, device, dtypes)
    kernels = getattr(impl, "KERNELS", None)
    if kernels is None:
        raise ValueError(f"backend={name!r} cannot run under torch.compile (it has no kernels); use 'torch', "
                         "'cpu', 'cuda', 'triton' or 'auto'")
    return kernels


def tile_kernels(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> TileKernels:
    """The tile kernels of ``backend`` for these inputs (the linear ops)."""
    return _backend_kernels(backend, device, dtypes).tiles


def logits_kernels(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> LogitsKernels:
    """The from-logits row kernels of ``backend`` for these inputs (the from-logits ops)."""
    return _backend_kernels(backend, device, dtypes).logits


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


# --------------------------------------------------------------------------------------------- options as op args
# Every TokenOptions field is an argument of every op, in the dataclass's order, its schema type read from the field's
# annotation: a new option reaches the compiled kernels with no edit here (a type the schema cannot carry fails at
# import), and tests/test_compile.py checks that eager and compiled calls hand the kernels equal options.

_SCHEMA_TYPES = {"int": "int", "float": "float", "bool": "bool", "float | None": "float?", "int | None": "int?"}
_OPTIONS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in dataclasses.fields(TokenOptions))


def _schema(tensors: str, outputs: str) -> str:
    return f"({tensors}, {_OPTIONS_SCHEMA}) -> {outputs}"


def _opts(values) -> TokenOptions:
    return TokenOptions(**dict(zip(TOKEN_OPTION_FIELDS, values, strict=True)))


def _opts_args(opts: TokenOptions) -> tuple:
    return tuple(getattr(opts, name) for name in TOKEN_OPTION_FIELDS)


def _split(args: tuple, leading: int) -> tuple[tuple, TokenOptions]:
    """An op's positional arguments -> (its ``leading`` tensor and dtype arguments, the options)."""
    return args[:leading], _opts(args[leading:])


def _empty_or(x: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if x is None else x


def _dtypes(*tensors: Tensor | None) -> tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in tensors if t is not None)


def _op_outputs(outs: tuple[Tensor, ...], state: driver.ForwardState,
                labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A forward's results as the ops' five static-shape outputs: ``lse`` scattered to every token, what a call
    without a reference lacks as empty tensors."""
    flat, rows, ref_lse = (labels.numel(),), state.rows, state.ref_lse
    logp, lse = outs[0], rows.scatter(state.lse, flat, state.lse.dtype)
    if ref_lse is None:
        return logp, logp.new_empty(_EMPTY), logp.new_empty(_EMPTY), lse, logp.new_empty(_EMPTY)
    return logp, outs[1], outs[2], lse, rows.scatter(ref_lse, flat, ref_lse.dtype)


def _fake_outputs(labels: Tensor, sdt: torch.dtype, with_ref: bool) -> tuple[Tensor, ...]:
    """The shapes and dtypes :func:`_op_outputs` returns, for the compiler's fake tensors."""
    per_token, flat = tuple(labels.shape), (labels.numel(),)
    ref_token, ref_flat = (per_token, flat) if with_ref else (_EMPTY, _EMPTY)
    return (labels.new_empty(per_token, dtype=sdt), labels.new_empty(ref_token, dtype=sdt),
            labels.new_empty(ref_token, dtype=sdt), labels.new_empty(flat, dtype=sdt),
            labels.new_empty(ref_flat, dtype=sdt))


# --------------------------------------------------------------------------------------------- linear path


_FIVE = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_LINEAR_TENSORS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, "
                   "Tensor labels")
_LINEAR_DTYPES = "ScalarType compute_dtype, ScalarType ref_compute_dtype, str backend"


def _refuse_graph_capture(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "dpo_kernels' compiled linear path cannot be captured in a CUDA graph: it reads on the host how many "
            "tokens are kept (a sync) before it plans its tiles. Compile without CUDA graphs (mode='default' or "
            "'max-autotune-no-cudagraphs'), or pass logits, whose compiled ops have no host sync")


def _linear_stats_impl(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cdt, ref_cdt, backend), opts = _split(args, 10)
    _refuse_graph_capture(hidden.device)
    ref, products, ref_products, kernels = _linear_op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                             (cdt, ref_cdt), backend)
    return _op_outputs(*driver.linear_forward(hidden, weight, bias, labels, ref, products, ref_products, opts,
                                              kernels), labels)


_linear_stats = torch.library.custom_op("dpo_kernels::linear_stats", _linear_stats_impl, mutates_args=(),
                                        schema=_schema(f"{_LINEAR_TENSORS}, {_LINEAR_DTYPES}", _FIVE))


@_linear_stats.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, compute_dtype, ref_compute_dtype, backend,
      *opts):
    tile_kernels(backend, hidden.device, _dtypes(hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    return _fake_outputs(labels, statistics_dtype(*_dtypes(hidden, weight, ref_hidden, ref_weight)),
                         ref_hidden is not None)


def _linear_stats_backward_impl(*args) -> tuple[Tensor, Tensor, Tensor]:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, grad_logp, grad_kl, need_hidden,
     need_weight, need_bias, cdt, ref_cdt, backend), opts = _split(args, 17)
    _refuse_graph_capture(hidden.device)
    ref, products, ref_products, kernels = _linear_op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                             (cdt, ref_cdt), backend)
    rows = driver.KeptTokens(labels, opts.ignore_index)
    sdt = products.out_dtype
    state = driver.ForwardState(rows, rows.select(lse, sdt), None if ref_lse is None else rows.select(ref_lse, sdt),
                                opts, kernels, ref, products, ref_products)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    dh, dw, db = driver.linear_backward(hidden, weight, bias, state, grad_logp, grad_kl, need)
    return _empty_or(dh, hidden), _empty_or(dw, weight), _empty_or(db, weight)


_linear_stats_backward = torch.library.custom_op(
    "dpo_kernels::linear_stats_backward", _linear_stats_backward_impl, mutates_args=(),
    schema=_schema(f"{_LINEAR_TENSORS}, Tensor lse, Tensor? ref_lse, Tensor? grad_logp, Tensor? grad_kl, "
                   f"bool need_hidden, bool need_weight, bool need_bias, {_LINEAR_DTYPES}", "(Tensor, Tensor, Tensor)"))


@_linear_stats_backward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, grad_logp, grad_kl, need_hidden,
      need_weight, need_bias, *rest):
    return (hidden.new_empty(tuple(hidden.shape) if need_hidden else _EMPTY),
            weight.new_empty(tuple(weight.shape) if need_weight else _EMPTY),
            weight.new_empty(_EMPTY) if bias is None or not need_bias else bias.new_empty(tuple(bias.shape)))


def _linear_op_inputs(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, compute, backend):
    """What both linear ops rebuild from their arguments: ``(ref head or None, products, ref products, tile
    kernels)``."""
    ref = None if ref_hidden is None else LinearHead(ref_hidden, ref_weight, ref_bias)
    products, ref_products = driver.head_products(hidden, weight, ref, compute)
    kernels = tile_kernels(backend, hidden.device, _dtypes(hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    return ref, products, ref_products, kernels


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cdt, rcdt, backend, *opts = inputs
    logp, ref_logp, kl, lse, ref_lse = output
    ctx.set_materialize_grads(False)  # an unused KL's gradient arrives as None: the reference is then not recomputed
    ctx.mark_non_differentiable(ref_logp, lse, ref_lse)
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse)
    ctx.args = (cdt, rcdt, backend, *opts)
    ctx.with_ref = ref_hidden is not None
    ctx.num_inputs = len(inputs)


def _linear_backward(ctx, grad_logp, grad_ref_logp, grad_kl, grad_lse, grad_ref_lse):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grad_kl = grad_kl if ctx.with_ref else None
    if (grad_logp is None and grad_kl is None) or not any(need):
        return (None,) * ctx.num_inputs
    dh, dw, db = _linear_stats_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse,
                                        ref_lse if ctx.with_ref else None, grad_logp, grad_kl, *need, *ctx.args)
    grads = (dh if need[0] else None, dw if need[1] else None, db if need[2] and bias is not None else None)
    return (*grads, *(None,) * (ctx.num_inputs - len(grads)))


_linear_stats.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels: Tensor, opts: TokenOptions, backend: str):
    """The compiled counterpart of :func:`driver.linear_token_stats` (``[R, T, D]`` rows, ``labels [R, T]``)."""
    refuse_under_compile(labels, inplace_backward=opts.inplace_backward)
    cdt = product_dtype(policy.hidden, policy.weight)  # under the caller's autocast, as eager mode decides it
    ref_cdt = cdt if ref is None else product_dtype(ref.hidden, ref.weight)
    ref_args = (None, None, None) if ref is None else (ref.hidden.detach(), ref.weight.detach(),
                                                       None if ref.bias is None else ref.bias.detach())
    outs = _linear_stats(policy.hidden, policy.weight, policy.bias, *ref_args, labels, cdt,
                         ref_cdt, backend, *_opts_args(opts))
    return outs[0] if ref is None else outs[:3]


# --------------------------------------------------------------------------------------------- from logits


def _logits_stats_impl(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    (logits, ref_logits, labels, backend), opts = _split(args, 4)
    kernels = logits_kernels(backend, logits.device, _dtypes(logits, ref_logits))
    logp, lse, ref_logp, ref_lse, kl = kernels.forward(logits, ref_logits, labels.reshape(-1).contiguous(), opts)
    shape = tuple(labels.shape)
    if ref_logits is None:
        return logp.view(shape), logp.new_empty(_EMPTY), logp.new_empty(_EMPTY), lse, logp.new_empty(_EMPTY)
    return logp.view(shape), ref_logp.view(shape), kl.view(shape), lse, ref_lse


_logits_stats = torch.library.custom_op("dpo_kernels::logits_stats", _logits_stats_impl, mutates_args=(),
                                        schema=_schema("Tensor logits, Tensor? ref_logits, Tensor labels, str backend",
                                                       _FIVE))


@_logits_stats.register_fake
def _(logits, ref_logits, labels, backend, *opts):
    logits_kernels(backend, logits.device, _dtypes(logits, ref_logits))
    return _fake_outputs(labels, statistics_dtype(*_dtypes(logits, ref_logits)), ref_logits is not None)


def _logits_stats_backward_impl(*args) -> Tensor:
    (logits, ref_logits, labels, lse, ref_lse, grad_logp, grad_kl, backend), opts = _split(args, 8)
    kernels = logits_kernels(backend, logits.device, _dtypes(logits, ref_logits))
    flat = labels.reshape(-1).contiguous()
    g, g_kl = logits_path.upstream_pair(grad_logp, grad_kl, flat, opts.ignore_index, lse.dtype)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    use_ref = g_kl is not None
    kernels.backward(logits, ref_logits if use_ref else None, flat, lse, ref_lse if use_ref else None, g, g_kl, opts,
                     grad)
    return grad


_logits_stats_backward = torch.library.custom_op(
    "dpo_kernels::logits_stats_backward", _logits_stats_backward_impl, mutates_args=(),
    schema=_schema("Tensor logits, Tensor? ref_logits, Tensor labels, Tensor lse, Tensor? ref_lse, Tensor? grad_logp, "
                   "Tensor? grad_kl, str backend", "Tensor"))


@_logits_stats_backward.register_fake
def _(logits, *rest):
    return logits.new_empty(tuple(logits.shape))


def _logits_setup(ctx, inputs, output):
    logits, ref_logits, labels, backend, *opts = inputs
    logp, ref_logp, kl, lse, ref_lse = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ref_logp, lse, ref_lse)
    ctx.save_for_backward(logits, ref_logits, labels, lse, ref_lse)
    ctx.args = (backend, *opts)
    ctx.with_ref = ref_logits is not None
    ctx.num_inputs = len(inputs)


def _logits_backward(ctx, grad_logp, grad_ref_logp, grad_kl, grad_lse, grad_ref_lse):
    logits, ref_logits, labels, lse, ref_lse = ctx.saved_tensors
    grad_kl = grad_kl if ctx.with_ref else None
    if (grad_logp is None and grad_kl is None) or not ctx.needs_input_grad[0]:
        return (None,) * ctx.num_inputs
    grad = _logits_stats_backward(logits, ref_logits, labels, lse, ref_lse if ctx.with_ref else None, grad_logp,
                                  grad_kl, *ctx.args)
    return (grad, *(None,) * (ctx.num_inputs - 1))


_logits_stats.register_autograd(_logits_backward, setup_context=_logits_setup)


def logits_token_stats(logits: Tensor, ref_logits: Tensor | None, labels: Tensor, opts: TokenOptions, backend: str):
    """The compiled counterpart of the from-logits primitives (``logits [R, T, V]``, ``labels [R, T]``)."""
    refuse_under_compile(labels, inplace_backward=opts.inplace_backward)
    outs = _logits_stats(logits, None if ref_logits is None else ref_logits.detach(), labels, backend,
                         *_opts_args(opts))
    return outs[0] if ref_logits is None else outs[:3]
