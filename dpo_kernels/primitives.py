"""The four public per-token primitives: validation, shape handling and dispatch to a backend.

Each is differentiable with respect to the policy inputs (logits, or hidden states, head weight and bias); the
reference inputs never receive a gradient. Statistics are fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs,
and exactly 0 at positions whose label is ``ignore_index``.

Options: the keyword options of :class:`~dpo_kernels.options.TokenOptions` (declared and documented there; each
primitive takes the ones that apply to it, see ``LOGITS_OPTIONS`` and ``LINEAR_OPTIONS``), ``backend`` and
``vocab_parallel_group``.

Shapes: ``labels [..., T]`` with any leading dimensions; logits ``[..., T, V]``; hidden states ``[..., T, D]``;
head weight ``[V, D]``; bias ``[V]``. Outputs have the shape of ``labels``.

``vocab_parallel_group`` (every primitive): a ``torch.distributed`` process group over which the vocabulary is
split; each rank passes its own contiguous slice of the logits (``[..., T, V_r]``) or of the head (``[V_r, D]``,
``[V_r]``), slices in rank order, and the same tokens and global labels; every rank gets the whole vocabulary's
outputs, and the hidden-state gradient is summed over the group in the backward (:mod:`dpo_kernels.ops.
vocab_parallel`). A head given as a DTensor sharded on dim 0 is such a slice over its mesh's group.
"""

from __future__ import annotations

import torch

from .checks import (
    check_agree,
    check_head,
    check_label_range,
    check_logits,
    check_same_on_every_rank,
    check_schedule,
    local_head,
    total_vocab,
    vocab_slice_of,
)
from .ops import dispatch
from .ops.common import LinearHead
from .options import TokenOptions, option_keywords

# The TokenOptions fields each kind of primitive takes (every option is declared once, in TokenOptions)
LOGITS_OPTIONS = ("ignore_index", "temperature", "softcap", "logit_scale", "token_chunk_size", "inplace_backward",
                  "check_labels")
LINEAR_OPTIONS = ("ignore_index", "temperature", "softcap", "logit_scale", "token_chunk_size", "vocab_chunk_size",
                  "tile_budget_mb", "grad_filter_eps", "check_labels")


@option_keywords(TokenOptions, only=LOGITS_OPTIONS)
def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, backend: str = "auto", vocab_parallel_group=None, **options
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(z)[label]`` from logits ``[..., T, V]``; returns ``[..., T]``.

    The extra memory is ``O(N)`` plus one tile; the backward writes the ``[..., T, V]`` gradient of the logits and
    nothing else of that size. ``inplace_backward=True`` writes that gradient into the logits' own storage (when the
    caller no longer needs them, e.g. they come out of the LM head); refused for a leaf that requires grad, and any
    other autograd use of the overwritten logits then raises PyTorch's in-place modification error.
    """
    return _from_logits(logits, None, labels, TokenOptions(**options), backend, vocab_parallel_group)


@option_keywords(TokenOptions, only=LOGITS_OPTIONS)
def token_logprobs_and_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *, backend: str = "auto",
    vocab_parallel_group=None, **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, reference log-probs and the per-token ``KL(ref || policy)``, in one pass over both rows.

    ``logits`` and ``ref_logits`` are ``[..., T, V]`` on one device, each row read in its own dtype (a bf16 reference
    beside fp32 policy logits is fine); the same post-processing
    (scale, softcap, temperature) applies to both. Returns ``(logps, ref_logps, kl)``, each ``[..., T]``;
    ``ref_logps`` is not differentiable and ``ref_logits`` receives no gradient. ``inplace_backward`` as in
    :func:`token_logprobs`.
    """
    return _from_logits(logits, ref_logits, labels, TokenOptions(**options), backend, vocab_parallel_group)


@option_keywords(TokenOptions, only=LINEAR_OPTIONS)
def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    backend: str = "auto", vocab_parallel_group=None, schedule: str = "auto", eager_budget_mb: float | None = None,
    **options
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

    ``schedule`` (a trainable head): ``"recompute"`` as above; ``"eager"`` keeps what the backward needs of each
    tile from the forward instead (bf16 operands: each logit's softmax weight in fp16, in the weight gradient's
    memory as far as it goes and within ``eager_budget_mb`` beside it, the chunks that do not fit recomputed;
    otherwise the fp32 tiles, which must fit the budget), so the backward runs no recompute GEMM: ``6 n D V`` FLOPs
    instead of ``8``, one backward only (``retain_graph=True`` then needs ``"recompute"``); ``"auto"`` (default)
    takes it on an accelerator with bf16 operands where it is estimated faster (:mod:`dpo_kernels.ops.linear.stored`
    says when; debug log on the ``dpo_kernels`` logger), else recomputes. A frozen head always forms the hidden
    states' gradient in its forward. ``eager_budget_mb``: as for :func:`dpo_kernels.fused_dpo_loss`.
    """
    return _from_hidden(LinearHead(hidden, weight, bias), None, labels, TokenOptions(**options), backend,
                        vocab_parallel_group, schedule, eager_budget_mb)


@option_keywords(TokenOptions, only=LINEAR_OPTIONS)
def linear_token_logprobs_and_kl(
    hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
    labels: torch.Tensor, *, bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
    backend: str = "auto", vocab_parallel_group=None, schedule: str = "auto", eager_budget_mb: float | None = None,
    **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, reference log-probs and ``KL(ref || policy)`` per token from two heads, in one pass.

    ``hidden [..., T, D]`` with ``weight [V, D]`` is the policy; ``ref_hidden [..., T, D_ref]`` with
    ``ref_weight [V, D_ref]`` the reference (``D_ref`` may differ from ``D``; ``ref_weight`` may be ``weight``).
    Returns ``(logps, ref_logps, kl)``, each ``[..., T]``; only the policy side receives gradients. Each reference
    tile is computed beside the policy's in the forward; the backward recomputes it only when ``kl`` received a
    gradient (a backward through ``logps`` alone never reads the reference). Tiles and memory as in
    :func:`linear_token_logprobs`, the tile budget shared by both heads.
    ``grad_filter_eps`` as in :func:`linear_token_logprobs`, also requiring every ``|softmax - q|`` below it.
    ``schedule`` / ``eager_budget_mb`` as in :func:`linear_token_logprobs`; the eager schedule keeps the
    reference's side of the KL's gradient too (twice the bytes), so its backward reads no reference either.
    """
    return _from_hidden(LinearHead(hidden, weight, bias), LinearHead(ref_hidden, ref_weight, ref_bias), labels,
                        TokenOptions(**options), backend, vocab_parallel_group, schedule, eager_budget_mb)


def _from_logits(logits, ref_logits, labels, opts: TokenOptions, backend: str, group):
    """The from-logits primitives after their options: the checks, then the dispatch."""
    check_logits("logits", logits, labels)
    if ref_logits is not None:
        check_logits("ref_logits", ref_logits, labels)
        check_agree(logits=logits, ref_logits=ref_logits)
        if ref_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"ref_logits must have the vocabulary size of logits ({logits.shape[-1]}), got {ref_logits.shape[-1]}"
            )
    vs = vocab_slice_of(group, logits.shape[-1], logits.device)
    check_label_range(labels, total_vocab(vs, logits.shape[-1]), opts)
    check_same_on_every_rank(vs, opts, labels)
    return dispatch.logits_stats(logits, ref_logits, labels, opts, backend, vs).public()


def _from_hidden(policy: LinearHead, ref: LinearHead | None, labels, opts: TokenOptions, backend: str, group,
                 schedule: str = "auto", eager_budget_mb: float | None = None):
    """The linear primitives after their options: a DTensor head made local, the checks, then the dispatch."""
    check_schedule(schedule, eager_budget_mb)
    weight, bias, group = local_head(policy.weight, policy.bias, group, labels)
    check_head(("hidden", policy.hidden), ("weight", weight), ("bias", bias), labels)
    policy = LinearHead(policy.hidden, weight, bias)
    if ref is not None:
        ref_weight, ref_bias, _ = local_head(ref.weight, ref.bias, group, labels)
        check_head(("ref_hidden", ref.hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias), labels)
        check_agree(hidden=policy.hidden, ref_hidden=ref.hidden)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must have the vocabulary size of weight ({weight.shape[0]} rows), got "
                             f"{ref_weight.shape[0]}")
        ref = LinearHead(ref.hidden, ref_weight, ref_bias)
    vs = vocab_slice_of(group, weight.shape[0], policy.hidden.device)
    facts = check_label_range(labels, total_vocab(vs, weight.shape[0]), opts, counts=True)
    check_same_on_every_rank(vs, opts, labels, policy.hidden, None if ref is None else ref.hidden)
    return dispatch.linear_stats(policy, ref, labels, opts, backend, vocab_slice=vs,
                                 kept_count=None if facts is None else facts.kept, schedule=schedule,
                                 eager_budget_mb=eager_budget_mb).public()
