"""The four public per-token primitives: validation, shape handling and dispatch to a backend.

Each is differentiable with respect to the policy inputs (logits, or hidden states, head weight and bias); the
reference inputs never receive a gradient. Statistics are fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs,
and exactly 0 at positions whose label is ``ignore_index``.

Shapes: ``labels [..., T]`` with any leading dimensions; logits ``[..., T, V]``; hidden states ``[..., T, D]``;
head weight ``[V, D]``; bias ``[V]``. Outputs have the shape of ``labels``.

``vocab_parallel_group`` (every primitive): a ``torch.distributed`` process group over which the vocabulary is
split; each rank passes its own contiguous slice of the logits (``[..., T, V_r]``) or of the head (``[V_r, D]``,
``[V_r]``), slices in rank order, and the same tokens and global labels; every rank gets the whole vocabulary's
outputs, and the hidden-state gradient is summed over the group in the backward (:mod:`dpo_kernels.ops.
vocab_parallel`). A head given as a DTensor sharded on dim 0 is such a slice over its mesh's group.
"""

from __future__ import annotations

import math

import torch

from .host_read import LabelFacts, read_label_facts
from .ops import vocab_parallel
from .ops.backend import entry_points, tile_kernels_of
from .ops.common import LinearHead
from .ops.linear import driver, eager, library_ops
from .ops.registry import resolve_backend
from .ops.vocab_parallel import VocabSlice
from .options import TOKEN_OPTION_FIELDS, TokenOptions
from .validation import (
    require_float,
    require_labels,
    require_labels_in_vocab,
    require_same_device,
    require_shape,
)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    token_chunk_size: int | None = None,
    inplace_backward: bool = False,
    vocab_parallel_group=None,
    check_labels: bool = True,
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(z)[label]`` from logits ``[..., T, V]``; returns ``[..., T]``.

    The extra memory is ``O(N)`` plus one tile; the backward writes the ``[..., T, V]`` gradient of the logits and
    nothing else of that size. ``inplace_backward=True`` writes that gradient into the logits' own storage (when the
    caller no longer needs them, e.g. they come out of the LM head); refused for a leaf that requires grad, and any
    other autograd use of the overwritten logits then raises PyTorch's in-place modification error.
    """
    opts = _options(locals())
    check_logits("logits", logits, labels)
    vs = vocab_slice_of(vocab_parallel_group, logits.shape[-1], logits.device)
    check_label_range(labels, total_vocab(vs, logits.shape[-1]), opts)
    check_same_on_every_rank(vs, opts, labels)
    return run_token_logprobs(logits, labels, opts, backend, vs)


def token_logprobs_and_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    token_chunk_size: int | None = None,
    inplace_backward: bool = False,
    vocab_parallel_group=None,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, reference log-probs and the per-token ``KL(ref || policy)``, in one pass over both rows.

    ``logits`` and ``ref_logits`` are ``[..., T, V]`` on one device, each row read in its own dtype (a bf16 reference
    beside fp32 policy logits is fine); the same post-processing
    (scale, softcap, temperature) applies to both. Returns ``(logps, ref_logps, kl)``, each ``[..., T]``;
    ``ref_logps`` is not differentiable and ``ref_logits`` receives no gradient. ``inplace_backward`` as in
    :func:`token_logprobs`.
    """
    opts = _options(locals())
    check_logits("logits", logits, labels)
    check_logits("ref_logits", ref_logits, labels)
    check_agree(logits=logits, ref_logits=ref_logits)
    if ref_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"ref_logits must have the vocabulary size of logits ({logits.shape[-1]}), got {ref_logits.shape[-1]}"
        )
    vs = vocab_slice_of(vocab_parallel_group, logits.shape[-1], logits.device)
    check_label_range(labels, total_vocab(vs, logits.shape[-1]), opts)
    check_same_on_every_rank(vs, opts, labels)
    return run_token_logprobs_and_kl(logits, ref_logits, labels, opts, backend, vs)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    tile_budget_mb: float | None = None,
    grad_filter_eps: float | None = None,
    vocab_parallel_group=None,
    check_labels: bool = True,
) -> torch.Tensor:
    """Per-token log-probs of ``z = hidden @ weight.T (+ bias)`` without building the ``[N, V]`` logits.

    ``hidden [..., T, D]``, ``weight [V, D]``, ``bias [V]`` on one device, each fp32, bf16 or fp16 (or fp64): the
    product runs in the autocast dtype under autocast, else in the promoted dtype (:mod:`dpo_kernels.ops.linear.
    products`), never rounded before it is folded. Returns ``[..., T]`` fp32
    (fp64 for fp64 inputs), 0 at ``ignore_index``. Gradients flow to ``hidden``, ``weight`` and ``bias``, each
    accumulated in fp32 and rounded once to its input's dtype.

    The linear path of :mod:`dpo_kernels.ops.linear` (the same design on every backend): ignored tokens are dropped
    before the first GEMM; tiles of at most ``tile_budget_mb`` MiB in all (the device's default of ``ops/linear/plan.py``; or
    ``token_chunk_size`` x ``vocab_chunk_size``) are folded into ``O(N)`` statistics in the forward and recomputed
    in the backward. Materialised besides the gradients: the kept rows of ``hidden`` when some are dropped, an fp32
    ``[N, D]`` accumulator for ``dH``, and the tiles. ``grad_filter_eps`` (off by default) skips backward tiles whose
    every ``|softmax - onehot|`` is below it; each skipped gradient entry of the logits is then at most
    ``eps * |upstream grad|`` (before the transform's factor).
    """
    opts = _options(locals())
    weight, bias, group = local_head(weight, bias, vocab_parallel_group, labels)
    check_head(("hidden", hidden), ("weight", weight), ("bias", bias), labels)
    vs = vocab_slice_of(group, weight.shape[0], hidden.device)
    facts = check_label_range(labels, total_vocab(vs, weight.shape[0]), opts, counts=True)
    check_same_on_every_rank(vs, opts, labels, hidden)
    return run_linear_token_stats(LinearHead(hidden, weight, bias), None, labels, opts, backend, vocab_slice=vs,
                                  kept_count=None if facts is None else facts.kept)


def linear_token_logprobs_and_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    tile_budget_mb: float | None = None,
    grad_filter_eps: float | None = None,
    vocab_parallel_group=None,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, reference log-probs and ``KL(ref || policy)`` per token from two heads, in one pass.

    ``hidden [..., T, D]`` with ``weight [V, D]`` is the policy; ``ref_hidden [..., T, D_ref]`` with
    ``ref_weight [V, D_ref]`` the reference (``D_ref`` may differ from ``D``; ``ref_weight`` may be ``weight``).
    Returns ``(logps, ref_logps, kl)``, each ``[..., T]``; only the policy side receives gradients. Each reference
    tile is computed beside the policy's in the forward; the backward recomputes it only when ``kl`` received a
    gradient (a backward through ``logps`` alone never reads the reference). Tiles and memory as in
    :func:`linear_token_logprobs`, the tile budget shared by both heads.
    ``grad_filter_eps`` as in :func:`linear_token_logprobs`, also requiring every ``|softmax - q|`` below it.
    """
    opts = _options(locals())
    weight, bias, group = local_head(weight, bias, vocab_parallel_group, labels)
    ref_weight, ref_bias, _ = local_head(ref_weight, ref_bias, group, labels)
    check_head(("hidden", hidden), ("weight", weight), ("bias", bias), labels)
    check_head(("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias), labels)
    check_agree(hidden=hidden, ref_hidden=ref_hidden)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must have the vocabulary size of weight ({weight.shape[0]} rows), got {ref_weight.shape[0]}"
        )
    vs = vocab_slice_of(group, weight.shape[0], hidden.device)
    facts = check_label_range(labels, total_vocab(vs, weight.shape[0]), opts, counts=True)
    check_same_on_every_rank(vs, opts, labels, hidden, ref_hidden)
    policy, ref = LinearHead(hidden, weight, bias), LinearHead(ref_hidden, ref_weight, ref_bias)
    return run_linear_token_stats(policy, ref, labels, opts, backend, vocab_slice=vs,
                                  kept_count=None if facts is None else facts.kept)


# --------------------------------------------------------------------------------------------- dispatch
# The run_* functions skip validation: they are for callers that have run the checks below themselves.


def run_token_logprobs(logits, labels, opts: TokenOptions, backend: str, vocab_slice: VocabSlice | None = None):
    shape = _sequences_shape(labels)
    if torch.compiler.is_compiling():
        library_ops.refuse_under_compile(labels, vocab_parallel_group=vocab_slice is not None)
        return library_ops.logits_token_stats(_as_sequences(logits, shape), None, labels.reshape(shape), opts,
                                              backend).view(labels.shape)
    name, impl = resolve_backend(backend, logits.device, logits.dtype)
    if vocab_slice is not None:
        out = driver.logits_token_stats(_as_sequences(logits, shape), None, labels.reshape(shape), opts,
                                        _tile_kernels(name, impl), vocab_slice)
    else:
        out = entry_points(impl).token_logprobs(_as_sequences(logits, shape), labels.reshape(shape), opts)
    return out.view(labels.shape)


def run_token_logprobs_and_kl(logits, ref_logits, labels, opts: TokenOptions, backend: str,
                              vocab_slice: VocabSlice | None = None):
    shape = _sequences_shape(labels)
    args = (_as_sequences(logits, shape), _as_sequences(ref_logits, shape), labels.reshape(shape), opts)
    if torch.compiler.is_compiling():
        library_ops.refuse_under_compile(labels, vocab_parallel_group=vocab_slice is not None)
        return tuple(o.view(labels.shape) for o in library_ops.logits_token_stats(*args, backend))
    name, impl = resolve_backend(backend, logits.device, _dtypes(logits, ref_logits))
    if vocab_slice is not None:
        outs = driver.logits_token_stats(*args, _tile_kernels(name, impl), vocab_slice)
    else:
        outs = entry_points(impl).token_logprobs_and_kl(*args)
    return tuple(o.view(labels.shape) for o in outs)


def run_linear_token_stats(policy: LinearHead, ref: LinearHead | None, labels, opts: TokenOptions, backend: str,
                           logging: bool = False, vocab_slice: VocabSlice | None = None, head_context=None,
                           kept_count: int | None = None):
    """``logp`` (or ``(logp, ref_logp, kl)`` with a reference head), each shaped like ``labels``; with ``logging``,
    ``(that, logged)`` where ``logged`` holds the per-token statistics trainers log (entropy, log sum p^2, mean logit,
    top-1), computed in the same forward pass. With ``vocab_slice`` the heads are this rank's vocabulary slices;
    ``head_context`` gathers a sharded head again in the backward (see :func:`driver.linear_token_stats`);
    ``kept_count``: the labels' kept tokens from the caller's one host read (:func:`check_label_range`)."""
    shape = _sequences_shape(labels)
    policy_rows = LinearHead(_as_sequences(policy.hidden, shape), policy.weight, policy.bias)
    ref_rows = None if ref is None else LinearHead(_as_sequences(ref.hidden, shape), ref.weight, ref.bias)
    if torch.compiler.is_compiling():
        library_ops.refuse_under_compile(labels, vocab_parallel_group=vocab_slice is not None,
                                         head_context=head_context,
                                         logging=logging)
        outs = library_ops.linear_token_stats(policy_rows, ref_rows, labels.reshape(shape), opts, backend)
        return outs.view(labels.shape) if ref is None else tuple(o.view(labels.shape) for o in outs)
    heads = (policy,) if ref is None else (policy, ref)
    dtypes = _dtypes(*(t for head in heads for t in (head.hidden, head.weight, head.bias)))
    name, impl = resolve_backend(backend, policy.hidden.device, dtypes)
    if vocab_slice is not None:
        outs = driver.linear_token_stats(policy_rows, ref_rows, labels.reshape(shape), opts, _tile_kernels(name, impl),
                                         logging, vocab_slice, head_context, kept_count)
    else:
        outs = entry_points(impl).linear_token_stats(policy_rows, ref_rows, labels.reshape(shape), opts, logging,
                                                     head_context, kept_count)
    main, logged = outs if logging else (outs, None)
    main = main.view(labels.shape) if ref is None else tuple(o.view(labels.shape) for o in main)
    if not logging:
        return main
    return main, {k: v.view(labels.shape) for k, v in logged.items()}


def linear_tile_kernels(heads: list[LinearHead], backend: str):
    """The tile kernels the linear path would run on for these heads under ``backend``, or why there are none: a
    string."""
    dtypes = _dtypes(*(t for head in heads for t in (head.hidden, head.weight, head.bias)))
    name, impl = resolve_backend(backend, heads[0].hidden.device, dtypes)  # refuses dtypes the backend cannot take
    kernels = tile_kernels_of(impl)
    return f"backend={name!r} has no tile kernels (the single-process oracle)" if kernels is None else kernels


def run_eager_pair_stats(policy: LinearHead, ref: LinearHead | None, labels, call):
    """The eager schedule (:func:`dpo_kernels.ops.linear.eager.eager_pair_stats`) over ``[..., T]`` rows: ``(loss,
    logp, ref_logp, kl, logged)``, each per-token tensor shaped like ``labels``."""
    shape = _sequences_shape(labels)
    policy_rows = LinearHead(_as_sequences(policy.hidden, shape), policy.weight, policy.bias)
    ref_rows = None if ref is None else LinearHead(_as_sequences(ref.hidden, shape), ref.weight, ref.bias)
    loss, *per_token, logged = eager.eager_pair_stats(policy_rows, ref_rows, labels.reshape(shape), call)
    per_token = [None if t is None else t.view(labels.shape) for t in per_token]
    logged = None if logged is None else {k: v.view(labels.shape) for k, v in logged.items()}
    return (loss, *per_token, logged)


def _tile_kernels(name: str, impl):
    """The tile kernels vocabulary parallelism runs on (every backend but the single-process oracle has them)."""
    kernels = tile_kernels_of(impl)
    if kernels is None:
        raise ValueError(
            f"backend={name!r} has no tile kernels and cannot take part in vocab_parallel_group; use 'torch', 'cpu', "
            "'cuda' or 'triton' (backend='reference' is the single-process oracle)"
        )
    return kernels


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


# --------------------------------------------------------------------------------------------- checks


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


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype, ...]:
    """Every dtype among ``tensors``, for the dispatcher (a backend must take all of them)."""
    return tuple(t.dtype for t in tensors if t is not None)


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


def _options(given: dict) -> TokenOptions:
    """The :class:`TokenOptions` of a primitive's keyword arguments (``locals()`` at its start): each field from the
    argument of its name, the dataclass's default where the primitive has no such argument."""
    return TokenOptions(**{name: given[name] for name in TOKEN_OPTION_FIELDS if name in given})


def _as_sequences(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[..., T, K]`` -> ``[R, T, K]`` (``shape = (R, T)``): a view whenever the leading dimensions merge."""
    return x.reshape(*shape, x.shape[-1])


def _sequences_shape(labels: torch.Tensor) -> torch.Size:
    """``(R, T)``: every leading dimension of ``labels [..., T]`` merged into ``R`` sequences."""
    return torch.Size((math.prod(labels.shape[:-1]), labels.shape[-1]))
