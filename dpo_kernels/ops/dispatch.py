"""The one dispatch: which backend runs a call, and which path (compiled, process group, oracle, op) carries it.

Every per-token call of the package comes through here, from the public primitives, :func:`dpo_kernels.
fused_dpo_loss` and the TRL head alike, after its inputs were checked (:mod:`dpo_kernels.checks`). Inputs are
``[..., T, K]`` with labels ``[..., T]``; the leading dimensions are merged into ``R`` sequences here, once, and the
results (:class:`~dpo_kernels.ops.token_stats.TokenStats`) come back shaped like the labels.

The branch, written once for both sources (:func:`_route`):

- under ``torch.compile``: the path's custom op by backend name (its fake kernel resolves the backend), after
  refusing what an op cannot carry (a process group, a head-gathering context, the logged statistics, an in-place
  backward);
- the reference oracle: its functions, autograd through full logits;
- from hidden states, and for a vocabulary-parallel slice of logits: the recompute Function of
  :mod:`dpo_kernels.ops.linear.recompute` on the backend's tile kernels (its row kernels for the logits);
- from logits otherwise: the from-logits op (:mod:`dpo_kernels.ops.logits_path`), the same as compiled.

Layers point one way: the backends' kernels, then the loops (:mod:`.logits_path`, :mod:`.linear`), then this module,
then the API.
"""

from __future__ import annotations

import math

import torch

from ..options import TokenOptions
from . import logits_path, reference
from .backend import BackendKernels
from .common import LinearHead
from .custom_ops import raise_value_error, refuse_under_compile
from .inplace import refuse_leaf_logits
from .linear import eager, recompute
from .linear.contract import TileKernels
from .registry import backend_kernels, resolve_backend
from .token_stats import TokenStats
from .vocab_parallel import VocabSlice


def logits_stats(logits: torch.Tensor, ref_logits: torch.Tensor | None, labels: torch.Tensor, opts: TokenOptions,
                 backend: str, vocab_slice: VocabSlice | None = None) -> TokenStats:
    """``logits [..., T, V]`` (and ``ref_logits``), ``labels [..., T]`` -> :class:`TokenStats` like ``labels``."""
    shape = sequences_shape(labels)
    rows, ref_rows = as_sequences(logits, shape), None if ref_logits is None else as_sequences(ref_logits, shape)
    flat_labels = labels.reshape(shape)

    def oracle():
        if ref_rows is None:
            return TokenStats(reference.token_logprobs(rows, flat_labels, opts))
        return TokenStats(*reference.token_logprobs_and_kl(rows, ref_rows, flat_labels, opts))

    def loop(kernels: BackendKernels):
        return recompute.loop_stats("logits", (rows,), flat_labels, ref_rows,
                                    recompute.LoopCall(opts, kernels.logits, vocab_slice=vocab_slice))

    def op(name: str):
        if opts.inplace_backward and not torch.compiler.is_compiling():
            refuse_leaf_logits(rows)
        return logits_path.token_stats(rows, ref_rows, flat_labels, opts, name)

    out = _route(backend, (logits, ref_logits), labels, opts, oracle, loop, op,
                 {"vocab_parallel_group": vocab_slice is not None}, eager_loop=vocab_slice is not None)
    return out.map(lambda t: t.view(labels.shape))


def linear_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor, opts: TokenOptions, backend: str,
                 *, logging: bool = False, vocab_slice: VocabSlice | None = None, head_context=None,
                 kept_count: int | None = None, kl_grad: bool = True, with_kl: bool = True,
                 schedule: str = "recompute", eager_budget_mb: float | None = None) -> TokenStats:
    """Heads ``hidden [..., T, D]`` x ``weight [V, D]`` (the reference's beside), ``labels [..., T]`` ->
    :class:`TokenStats` like ``labels``; ``logged`` with ``logging``. With ``vocab_slice`` the heads are this rank's
    vocabulary slices; ``head_context(weight, bias)`` gathers a sharded head again in the backward;
    ``kept_count``: the labels' kept tokens from the caller's one host read; ``kl_grad=False``: the caller will not
    differentiate the KL (a frozen head then prepares no KL gradient in the forward; one that arrives anyway is
    recomputed); ``with_kl=False``: the caller wants no KL (the loop then folds each reference tile alone, in the
    policy's scratch, and its ``TokenStats.kl`` is ``None``; the oracle and the compiled op still compute it);
    ``schedule`` / ``eager_budget_mb``: a trainable head's schedule (:mod:`.linear.stored`; the tile loop's only:
    ``"eager"`` is refused under ``torch.compile``, and the oracle, whose backward is autograd's, ignores it)."""
    shape = sequences_shape(labels)
    policy_rows = _head_rows(policy, shape)
    ref_rows = None if ref is None else _head_rows(ref, shape)
    flat_labels = labels.reshape(shape)

    def oracle():
        if schedule == "eager":  # asked for by name: never run another schedule in its place
            raise_value_error(f"schedule='eager' cannot run here: backend={backend!r} has no tile kernels (the "
                              "single-process oracle); use schedule='auto' or 'recompute'", labels)
        out = reference.linear_token_stats(policy_rows, ref_rows, flat_labels, opts, logging)
        main, logged = out if logging else (out, None)
        return TokenStats(*((main,) if ref is None else main), logged=logged)

    def loop(kernels: BackendKernels):
        call = recompute.LoopCall(opts, kernels.tiles, logging, vocab_slice, head_context, kept_count, kl_grad,
                                  with_kl or kl_grad, schedule, eager_budget_mb)
        return recompute.loop_stats("linear", (policy_rows.hidden, policy_rows.weight, policy_rows.bias), flat_labels,
                                    ref_rows, call)

    def op(name: str):
        return recompute.linear_stats(policy_rows, ref_rows, flat_labels, opts, name)

    tensors = tuple(t for head in (policy, ref) if head is not None for t in (head.hidden, head.weight, head.bias))
    out = _route(backend, tensors, labels, opts, oracle, loop, op,
                 {"vocab_parallel_group": vocab_slice is not None, "head_context": head_context is not None,
                  "logging": logging, "schedule='eager'": schedule == "eager"}, eager_loop=True)
    return out.map(lambda t: t.view(labels.shape))


def eager_pair_stats(policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor,
                     call: eager.EagerCall) -> tuple[torch.Tensor, TokenStats]:
    """The eager schedule (:mod:`dpo_kernels.ops.linear.eager`) over ``[..., T]`` rows: ``(loss, token_stats)``,
    the per-token statistics shaped like ``labels``."""
    shape = sequences_shape(labels)
    ref_rows = None if ref is None else _head_rows(ref, shape)
    loss, out = eager.eager_pair_stats(_head_rows(policy, shape), ref_rows, labels.reshape(shape), call)
    return loss, out.map(lambda t: t.view(labels.shape))


def tile_kernels(heads: list[LinearHead], backend: str) -> TileKernels | str:
    """The tile kernels the linear path would run on for these heads under ``backend``, or why there are none (a
    string); refuses what :func:`resolve_backend` refuses."""
    tensors = [t for head in heads for t in (head.hidden, head.weight, head.bias) if t is not None]
    name, module = resolve_backend(backend, tensors[0].device, tuple(t.dtype for t in tensors))
    kernels = getattr(module, "KERNELS", None)
    return f"backend={name!r} has no tile kernels (the single-process oracle)" if kernels is None else kernels.tiles


def sequences_shape(labels: torch.Tensor) -> torch.Size:
    """``(R, T)``: every leading dimension of ``labels [..., T]`` merged into ``R`` sequences."""
    return torch.Size((math.prod(labels.shape[:-1]), labels.shape[-1]))


def as_sequences(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[..., T, K]`` -> ``[R, T, K]`` (``shape = (R, T)``): a view whenever the leading dimensions merge."""
    return x.reshape(*shape, x.shape[-1])


def _head_rows(head: LinearHead, shape: torch.Size) -> LinearHead:
    return LinearHead(as_sequences(head.hidden, shape), head.weight, head.bias)


def _route(backend: str, tensors: tuple, labels: torch.Tensor, opts: TokenOptions, oracle, loop, op,
           features: dict[str, bool], eager_loop: bool) -> TokenStats:
    """``oracle()``, ``loop(backend_kernels)`` or ``op(backend_name)``: the three ways a call runs. ``features``: what
    the call uses that the op cannot carry, each refused by name under ``torch.compile``; ``eager_loop``: outside
    compilation the call runs ``loop``, not ``op``."""
    if torch.compiler.is_compiling():
        refuse_under_compile(labels, **features, inplace_backward=opts.inplace_backward)
        return op(backend)
    given = [t for t in tensors if t is not None]
    name, module = resolve_backend(backend, given[0].device, tuple(t.dtype for t in given))
    if getattr(module, "KERNELS", None) is None and not features["vocab_parallel_group"]:
        return oracle()  # needs no head_context: its backward is autograd's, as nn.Linear's
    if not eager_loop:
        return op(name)
    return loop(backend_kernels(name, "vocab_parallel_group", *given))
