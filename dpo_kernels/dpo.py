"""``fused_dpo_loss``: preference objectives from logits or hidden states, never building a ``[N, V]`` tensor on the
fused paths. Rows ``0..B-1`` of every batched input are the chosen responses, rows ``B..2B-1`` the rejected ones.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checks, losses
from .host_read import LabelFacts
from .metrics import PendingMetrics
from .ops import dispatch
from .ops.common import LinearHead
from .ops.custom_ops import raise_value_error
from .ops.linear.eager import EagerCall, EagerNeed, estimated_slower
from .ops.linear import plan as linear_plan
from .ops.linear.products import converted_operand_bytes, products_now
from .ops.registry import require_backend
from .ops.torch_chunked import log_sum_sq_probs
from .ops.vocab_parallel import VocabSlice
from .options import TOKEN_OPTION_FIELDS, TokenOptions, option_keywords, statistics_dtype
from .validation import is_finite_number, require_float, require_labels, require_positive, require_same_device

_OBJECTIVE_DEFAULTS = losses.ObjectiveConfig()
SCHEDULES = checks.SCHEDULES
_log = logging.getLogger("dpo_kernels")
_TOKEN_DEFAULTS = TokenOptions()


@dataclass(frozen=True)
class DPOLossConfig:
    """Every non-tensor option of :func:`fused_dpo_loss`, validated once at construction.

    ``loss_type`` may be one name or a sequence of names combined as ``sum_k loss_weights[k] * loss_k`` (weights
    default to 1). The other fields are documented on :func:`fused_dpo_loss`; their defaults come from
    ``losses.ObjectiveConfig`` and ``TokenOptions`` (a test keeps the public signatures in agreement).
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = _OBJECTIVE_DEFAULTS.beta
    alpha: float = _OBJECTIVE_DEFAULTS.alpha
    label_smoothing: float = _OBJECTIVE_DEFAULTS.label_smoothing
    simpo_gamma: float = _OBJECTIVE_DEFAULTS.simpo_gamma
    discopop_tau: float = _OBJECTIVE_DEFAULTS.discopop_tau
    f_divergence_type: str = _OBJECTIVE_DEFAULTS.f_divergence_type
    f_alpha_divergence_coef: float = _OBJECTIVE_DEFAULTS.f_alpha_divergence_coef
    cpo_alpha: float = _OBJECTIVE_DEFAULTS.cpo_alpha
    alphapo_alpha: float = _OBJECTIVE_DEFAULTS.alphapo_alpha
    reference_free: bool = False
    average_log_prob: bool = False
    use_weighting: bool = False
    ld_alpha: float | None = None
    ignore_index: int = _TOKEN_DEFAULTS.ignore_index
    shift: bool = False
    temperature: float = _TOKEN_DEFAULTS.temperature
    softcap: float | None = _TOKEN_DEFAULTS.softcap
    logit_scale: float = _TOKEN_DEFAULTS.logit_scale
    backend: str = "auto"
    schedule: str = "auto"
    eager_budget_mb: float | None = None
    token_chunk_size: int | None = _TOKEN_DEFAULTS.token_chunk_size
    vocab_chunk_size: int | None = _TOKEN_DEFAULTS.vocab_chunk_size
    tile_budget_mb: float | None = _TOKEN_DEFAULTS.tile_budget_mb
    inplace_backward: bool = _TOKEN_DEFAULTS.inplace_backward
    grad_filter_eps: float | None = _TOKEN_DEFAULTS.grad_filter_eps
    vocab_parallel_group: object = None
    check_labels: bool = _TOKEN_DEFAULTS.check_labels
    loss_types: tuple[str, ...] = field(init=False)
    weights: tuple[float, ...] = field(init=False)
    objective: losses.ObjectiveConfig = field(init=False)
    token_options: TokenOptions = field(init=False)

    def __post_init__(self) -> None:
        names = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not names:
            raise ValueError("loss_type must name at least one objective, got an empty sequence")
        for name in names:
            losses.objective(name)
        weights = (1.0,) * len(names) if self.loss_weights is None else tuple(self.loss_weights)
        if len(weights) != len(names) or not all(is_finite_number(w) for w in weights):
            raise ValueError(
                f"loss_weights must be {len(names)} finite number(s), one per loss_type {list(names)}, "
                f"got {self.loss_weights!r}"
            )
        require_backend(self.backend)
        checks.check_schedule(self.schedule, self.eager_budget_mb)
        require_positive("beta", self.beta)
        require_positive("discopop_tau", self.discopop_tau)
        for name in ("alpha", "simpo_gamma", "f_alpha_divergence_coef", "label_smoothing", "alphapo_alpha"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not (is_finite_number(self.cpo_alpha) and self.cpo_alpha >= 0):
            raise ValueError(f"cpo_alpha (CPO's weight of the chosen responses' NLL) must be a finite number >= 0, "
                             f"got {self.cpo_alpha!r}")
        objectives = {name: losses.objective(name) for name in names}
        self._check_label_smoothing(objectives)
        if "tdpo2" in names and not 0 <= self.alpha:
            raise ValueError(f"alpha (TDPO2's weight of the KL difference) must be >= 0, got {self.alpha}: a negative "
                             "one turns the KL penalty into a reward")
        if "tdpo2" in names and self.alpha > 1:
            warnings.warn(f"alpha={self.alpha} > 1 weighs TDPO2's KL difference above the log-ratios (the TDPO paper "
                          "uses alpha in [0, 1], default 0.5)", UserWarning, stacklevel=3)
        for name in ("reference_free", "average_log_prob", "use_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.ld_alpha is not None and not (is_finite_number(self.ld_alpha) and 0 <= self.ld_alpha <= 1):
            raise ValueError(f"ld_alpha must be None or a number in [0, 1] (LD-DPO's weight of the tokens past the "
                             f"shorter response of a pair), got {self.ld_alpha!r}")
        if self.f_divergence_type not in losses.F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {losses.F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl":
            unsupported = [n for n, o in objectives.items() if not o.f_divergence]
            if unsupported:
                supported = sorted(n for n, o in losses.OBJECTIVES.items() if o.f_divergence)
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} applies to loss_type in {supported}; "
                    f"{unsupported} must use f_divergence_type='reverse_kl'"
                )
        if self.reference_free and any(o.uses_token_kl for o in objectives.values()):
            raise ValueError("reference_free=True cannot be used with a TDPO loss_type: the token-level KL needs a reference")
        set_ = object.__setattr__
        set_(self, "loss_types", names)
        set_(self, "weights", tuple(float(w) for w in weights))
        # the two option dataclasses, each field taken from this config's field of the same name
        set_(self, "objective", losses.ObjectiveConfig(**_pick_attributes(self, _OBJECTIVE_FIELDS)))
        set_(self, "token_options", TokenOptions(**_pick_attributes(self, TOKEN_OPTION_FIELDS)))

    def _check_label_smoothing(self, objectives: dict[str, losses.Objective]) -> None:
        eps = self.label_smoothing
        users = {n: o.smoothing for n, o in objectives.items() if o.smoothing is not None}
        if not users and eps != 0:
            takers = sorted(n for n, o in losses.OBJECTIVES.items() if o.smoothing is not None)
            raise ValueError(f"label_smoothing={eps} is not used by loss_type {list(objectives)}; it applies to {takers}")
        for name, allowed in users.items():
            if not allowed.contains(eps):
                raise ValueError(f"label_smoothing must be in {allowed.describe()} for loss_type {name!r}, got {eps}")

    def options(self) -> dict:
        """The keyword options this config was built from (``DPOLossConfig(**config.options())`` rebuilds it)."""
        return _pick_attributes(self, _CONFIG_FIELDS)

    @property
    def uses_token_kl(self) -> bool:
        return any(losses.objective(n).uses_token_kl for n in self.loss_types)

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and any(losses.objective(n).uses_reference for n in self.loss_types)


# the fields of the objectives' option dataclass, each also a field of DPOLossConfig (named once, at import: Dynamo
# cannot call dataclasses.fields on a class while tracing)
_OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(losses.ObjectiveConfig))


def _pick_attributes(config: "DPOLossConfig", names: tuple[str, ...]) -> dict:
    return {name: getattr(config, name) for name in names}


@dataclass
class DPOLossOutput:
    """What :func:`fused_dpo_loss` returns. Per-pair tensors are ``[B]``.

    ``loss`` is the differentiable scalar. ``chosen_logps`` / ``rejected_logps`` are the policy's sequence log-probs
    (sum, or mean with ``average_log_prob``) and stay differentiable, so callers can add terms of their own.
    Rewards are detached. ``chosen_kl`` / ``rejected_kl`` are the token-level KLs aggregated as the log-probs are
    (summed, or averaged with ``average_log_prob``), ``None`` unless a TDPO loss is used. ``metrics`` is a plain
    ``dict[str, float]`` of the names TRL logs, read from the device together on the first look, not inside the call
    (a ``dict`` of 0-dim fp64 tensors under ``torch.compile``, where no host read may happen).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_kl: torch.Tensor | None
    rejected_kl: torch.Tensor | None
    # the metrics before their read; a dict of tensors under torch.compile
    pending_metrics: PendingMetrics | dict[str, torch.Tensor] = field(repr=False)

    @property
    def metrics(self) -> dict[str, float] | dict[str, torch.Tensor]:
        if isinstance(self.pending_metrics, PendingMetrics):
            return self.pending_metrics.read()
        return self.pending_metrics

    def add_metrics(self, values: dict[str, torch.Tensor]) -> None:
        """Add detached 0-dim tensors to the metrics, read with the others when first looked at."""
        if isinstance(self.pending_metrics, PendingMetrics):
            self.pending_metrics.add(values)
        else:
            self.pending_metrics.update(_compiled_metrics(values))


@option_keywords(DPOLossConfig)
def fused_dpo_loss(
    *,
    labels: torch.Tensor,
    policy_logits: torch.Tensor | None = None,
    policy_hidden: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    ref_lm_head_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    **options,
) -> DPOLossOutput:
    """A preference-optimisation loss over ``B`` pairs stacked as ``2B`` rows (chosen first, then rejected).

    Policy, one of:
        ``policy_logits [2B, T, V]``; or ``policy_hidden [2B, T, D]`` with ``lm_head_weight [V, D]`` (and
        ``lm_head_bias [V]``): the fused path, which never builds the logits.
    Reference, at most one of (none when ``reference_free`` or every loss is reference-free):
        ``ref_logits [2B, T, V]``; ``ref_hidden [2B, T, D_ref]`` with ``ref_lm_head_weight [V, D_ref]`` (and
        ``ref_lm_head_bias``); or precomputed ``ref_logps``: ``[2B]`` sequence log-probs aggregated as the policy's
        (sums, or means with ``average_log_prob``) or ``[2B, T]`` per-token log-probs. TDPO needs logits or hidden
        states, in the same form as the policy, because it reads both distributions.
    ``labels [2B, T]`` score the logits at the same position; ``shift=True`` applies the causal shift instead
    (position ``t`` scores ``labels[:, t+1]``). Positions equal to ``ignore_index`` are masked.

    Options: ``loss_type`` (a name or a list, see ``losses.OBJECTIVES``) with ``loss_weights``; ``beta`` (> 0);
    ``alpha`` (TDPO2); ``label_smoothing`` (sigmoid/conservative, robust, exo_pair, aot, simpo, cpo);
    ``simpo_gamma``; ``cpo_alpha`` (CPO's weight of the chosen responses' NLL); ``alphapo_alpha`` (CPO with
    AlphaPO's rewards, TRL's CPO ``alpha``; 0: off);
    ``discopop_tau``; ``f_divergence_type`` and ``f_alpha_divergence_coef`` (f-DPO); ``reference_free``;
    ``average_log_prob``; ``use_weighting`` (WPO, as TRL: each pair's losses are multiplied by the detached
    ``w_w w_l``, ``w = exp(mean over the sequence's tokens of (logp_t - log sum_v p_v^2))``; the policy's
    ``log sum p^2`` comes from the same fused pass from hidden states, from one more detached pass over given logits);
    ``ld_alpha`` (LD-DPO, as TRL: the sequence log-probs of policy and reference weigh the tokens of each response
    past the first ``min(len_w, len_l)`` of its pair by ``ld_alpha``; precomputed ``[2B]`` ``ref_logps`` are taken as
    already weighted); the logit post-processing ``temperature``, ``softcap``, ``logit_scale`` (applied to policy
    and reference alike); ``backend``; ``schedule`` (from hidden states: ``"eager"`` keeps what the policy's
    gradients need from the forward within ``eager_budget_mb``: bf16 GEMM operands keep each logit's softmax weight
    in fp16, in the weight's gradient as far as it goes (the budget bounds the rest), the vocabulary chunks that
    fit, and the backward forms every gradient from them in one pass, recomputing the others; otherwise the fp32
    tiles of groups of whole pairs, their gradients formed in the forward; ``"recompute"`` recomputes the tiles in
    the backward; ``"auto"``, the default, takes eager where it can run and, on an accelerator, is estimated faster,
    see :mod:`dpo_kernels.ops.linear.eager`, and logs its choice at debug level on the ``dpo_kernels`` logger); the
    tile sizes (``token_chunk_size``, ``vocab_chunk_size``) or their memory
    budget ``tile_budget_mb``; ``inplace_backward`` (policy logits: their gradient overwrites them) and
    ``grad_filter_eps`` (hidden states: skip negligible backward tiles), as on the primitives;
    ``vocab_parallel_group``: the policy's and the reference's logits, or heads, are this rank's slices of a
    vocabulary split over that process group (or the heads are DTensors sharded on dim 0), as on the primitives;
    ``check_labels`` (default on): check the label range, and warn once when ``labels`` look like unshifted
    ``input_ids`` (a first column that is not ``ignore_index`` while ``shift=False``); each costs a host sync.

    Under ``torch.compile(fullgraph=True)`` the whole call traces without a graph break: the kernels run as
    ``torch.library`` custom ops (:mod:`dpo_kernels.ops.custom_ops`), the label range check becomes an
    in-graph asynchronous assert (``check_labels=False`` drops it), the unshifted-labels warning is skipped, and
    ``metrics`` holds 0-dim fp64 tensors instead of floats (no host sync inside the graph).
    ``vocab_parallel_group`` and ``inplace_backward`` are refused there.

    A policy and a reference both given as hidden states go through one fused call: each tile of the reference is
    computed beside the policy's, for the same kept tokens, in the forward only; the backward recomputes the policy
    alone (and the reference only for TDPO's KL gradient).
    """
    config = DPOLossConfig(**options)
    inputs = PreferenceInputs(labels, policy_logits, policy_hidden, lm_head_weight, lm_head_bias, ref_logits, ref_hidden,
                              ref_lm_head_weight, ref_lm_head_bias, ref_logps)
    return compute_dpo_loss(config, inputs)


@dataclass(frozen=True)
class PreferenceInputs:
    """The tensors of one call of :func:`fused_dpo_loss` (see there for shapes)."""

    labels: torch.Tensor
    policy_logits: torch.Tensor | None = None
    policy_hidden: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    ref_lm_head_weight: torch.Tensor | None = None
    ref_lm_head_bias: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def validate(self, config: DPOLossConfig) -> tuple[VocabSlice | None, LabelFacts | None]:
        """Every check, before any kernel; returns this rank's vocabulary slice under ``vocab_parallel_group`` and
        the scored labels' facts (kept tokens per row) from the call's one host read (``None`` under compile)."""
        labels = require_labels("labels", self.labels)
        if labels.dim() != 2:
            raise ValueError(f"labels must be [2B, T] (chosen rows, then rejected rows), got shape {list(labels.shape)}")
        if labels.shape[0] == 0 or labels.shape[0] % 2:
            raise ValueError(
                f"labels must have an even, non-zero number of rows (B chosen then B rejected), got {labels.shape[0]}"
            )
        if config.shift and labels.shape[1] < 2:
            raise ValueError(f"shift=True needs at least 2 positions per row, labels has {labels.shape[1]}")
        if (self.policy_logits is None) == (self.policy_hidden is None):
            raise ValueError("give the policy exactly once: policy_logits, or policy_hidden with lm_head_weight")
        if self.policy_hidden is not None and self.lm_head_weight is None:
            raise ValueError("policy_hidden needs lm_head_weight [V, D] (and optionally lm_head_bias)")
        if self.policy_logits is not None and (self.lm_head_weight is not None or self.lm_head_bias is not None):
            raise ValueError("lm_head_weight / lm_head_bias go with policy_hidden; they are not used with policy_logits")
        given = [n for n in ("ref_logits", "ref_hidden", "ref_logps") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give the reference at most once; got {', '.join(given)}")
        if self.ref_hidden is not None and self.ref_lm_head_weight is None:
            raise ValueError("ref_hidden needs ref_lm_head_weight [V, D_ref] (and optionally ref_lm_head_bias)")
        if self.ref_hidden is None and (self.ref_lm_head_weight is not None or self.ref_lm_head_bias is not None):
            raise ValueError("ref_lm_head_weight / ref_lm_head_bias go with ref_hidden")
        if config.uses_reference and not given:
            raise ValueError(
                f"loss_type {list(config.loss_types)} needs a reference: pass ref_logits, ref_hidden with "
                "ref_lm_head_weight, or ref_logps, or set reference_free=True"
            )
        if not config.uses_reference and given:
            why = "reference_free=True" if config.reference_free else f"loss_type {list(config.loss_types)}"
            raise ValueError(f"{why} uses no reference, but {given[0]} was given; drop it")
        if config.use_weighting and self.policy_logits is not None and config.vocab_parallel_group is not None:
            raise ValueError("use_weighting reads log sum p^2 over the whole vocabulary, which a vocabulary-parallel "
                             "slice of policy_logits does not hold; pass policy_hidden with the sliced head instead "
                             "(its fused pass combines that statistic across the group)")
        if config.uses_token_kl:
            if self.ref_logps is not None:
                raise ValueError(
                    "TDPO (loss_type tdpo1/tdpo2) needs the reference distribution for its token-level KL: pass "
                    "ref_logits or ref_hidden, not precomputed ref_logps"
                )
            if (self.policy_logits is None) != (self.ref_logits is None):
                raise ValueError(
                    "TDPO reads policy and reference in one pass: give both as logits (policy_logits, ref_logits) or "
                    "both as hidden states (policy_hidden, ref_hidden)"
                )
        return self._check_tensors(labels, config)

    def local_heads(self, group) -> tuple["PreferenceInputs", object]:
        """DTensor heads (sharded on dim 0) replaced by this rank's slices, and the vocabulary-parallel group."""
        weight, bias, group = checks.local_head(self.lm_head_weight, self.lm_head_bias, group, self.labels)
        ref_weight, ref_bias, group = checks.local_head(self.ref_lm_head_weight, self.ref_lm_head_bias, group,
                                                        self.labels)
        return dataclasses.replace(self, lm_head_weight=weight, lm_head_bias=bias, ref_lm_head_weight=ref_weight,
                                   ref_lm_head_bias=ref_bias), group

    def _check_tensors(self, labels: torch.Tensor, config: DPOLossConfig) -> tuple[VocabSlice | None,
                                                                                  LabelFacts | None]:
        """Shapes, dtypes and devices of every tensor against each other, and the label range, checked once; the
        label range, the kept tokens of each row and the unshifted-labels check share one host read."""
        if self.policy_logits is not None:
            checks.check_logits("policy_logits", self.policy_logits, labels)
            vocab = self.policy_logits.shape[-1]
        else:
            checks.check_head(
                ("policy_hidden", self.policy_hidden),
                ("lm_head_weight", self.lm_head_weight),
                ("lm_head_bias", self.lm_head_bias),
                labels,
            )
            vocab = self.lm_head_weight.shape[0]
        policy = self.policy_logits if self.policy_logits is not None else self.policy_hidden
        if self.ref_logits is not None:
            checks.check_logits("ref_logits", self.ref_logits, labels)
            reference, ref_vocab = self.ref_logits, self.ref_logits.shape[-1]
        elif self.ref_hidden is not None:
            checks.check_head(
                ("ref_hidden", self.ref_hidden),
                ("ref_lm_head_weight", self.ref_lm_head_weight),
                ("ref_lm_head_bias", self.ref_lm_head_bias),
                labels,
            )
            reference, ref_vocab = self.ref_hidden, self.ref_lm_head_weight.shape[0]
        else:
            reference, ref_vocab = None, vocab
        if ref_vocab != vocab:
            raise ValueError(f"the reference must have the policy's vocabulary size {vocab}, got {ref_vocab}")
        if reference is not None:
            policy_name = "policy_logits" if self.policy_logits is not None else "policy_hidden"
            ref_name = "ref_logits" if self.ref_logits is not None else "ref_hidden"
            checks.check_agree(**{policy_name: policy, ref_name: reference})
        if self.ref_logps is not None:
            ref = require_float("ref_logps", self.ref_logps)
            rows, seq = labels.shape[0], labels.shape[1] - (1 if config.shift else 0)
            if tuple(ref.shape) not in ((rows,), (rows, seq), (rows, labels.shape[1])):
                raise ValueError(
                    f"ref_logps must be [2B]={[rows]} sequence log-probs or [2B, T]={[rows, seq]} per-token "
                    f"log-probs, got {list(ref.shape)}"
                )
            require_same_device(labels=labels, ref_logps=ref)
        scored = labels[:, 1:] if config.shift else labels
        vocab_slice = checks.vocab_slice_of(config.vocab_parallel_group, vocab, policy.device)
        unshifted_check = config.check_labels and not config.shift and not _warned_unshifted
        facts = checks.check_label_range(scored, checks.total_vocab(vocab_slice, vocab), config.token_options,
                                         per_row=True, first_column=unshifted_check)
        checks.check_same_on_every_rank(vocab_slice, config.token_options, labels, self.policy_hidden, self.ref_hidden)
        if unshifted_check and facts is not None and facts.first_scored:
            _warn_unshifted()
        return vocab_slice, facts


# DPOLossConfig's options (fused_dpo_loss's keywords besides the tensors, derived from them by option_keywords)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DPOLossConfig) if f.init)


_warned_unshifted = False


def _warn_unshifted() -> None:
    """Once per process: labels whose first position is scored look like ``input_ids`` passed without ``shift=True``
    (a DPO batch starts with its prompt, which is masked). Position ``t`` would then score its own token, not the
    next one, and the loss would silently be wrong."""
    global _warned_unshifted
    _warned_unshifted = True
    warnings.warn(
        "fused_dpo_loss: labels[:, 0] is not ignore_index, as if labels were input_ids; with shift=False the logits "
        "at position t score labels[:, t]. Pass shift=True for Hugging Face-style labels (labels = input_ids, "
        "prompt masked), or mask the first position if your labels are already aligned. This warning is shown once; "
        "check_labels=False skips the check.",
        UserWarning, stacklevel=4,
    )


def compute_dpo_loss(config: DPOLossConfig, inputs: PreferenceInputs) -> DPOLossOutput:
    """The body of :func:`fused_dpo_loss` for an already validated ``config``."""
    inputs, group = inputs.local_heads(config.vocab_parallel_group)
    if group is not config.vocab_parallel_group:
        config = dataclasses.replace(config, vocab_parallel_group=group)
    vocab_slice, facts = inputs.validate(config)
    labels = _shifted_labels(inputs.labels, config)
    eager = _eager_plan(config, inputs, labels, vocab_slice, facts)
    if eager is not None:
        loss, token_logps, token_ref_logps, token_kl, log_sum_sq = _eager_statistics(config, inputs, labels,
                                                                                      vocab_slice, *eager)
    else:
        kept = None if facts is None else facts.kept
        loss, (token_logps, token_ref_logps, token_kl, log_sum_sq) = None, _token_statistics(config, inputs,
                                                                                            vocab_slice, kept)
    pair = _pair_loss(config, labels, token_logps, token_ref_logps, token_kl, log_sum_sq, inputs.ref_logps)
    stats = pair.stats
    chosen_rewards, rejected_rewards = losses.rewards(stats, config.objective)
    metrics = _metrics(stats, chosen_rewards, rejected_rewards, pair.parts if len(pair.parts) > 1 else {})
    return DPOLossOutput(
        loss=pair.loss if loss is None else loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=stats.chosen_logps,
        rejected_logps=stats.rejected_logps,
        chosen_kl=stats.chosen_kl,
        rejected_kl=stats.rejected_kl,
        pending_metrics=metrics,
    )


@dataclass(frozen=True)
class _PairLoss:
    """The pair statistics of a batch (or of a group of its pairs), the loss and each loss_type's mean."""

    stats: losses.PairStatistics
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def _pair_loss(config: DPOLossConfig, labels, token_logps, token_ref_logps, token_kl, log_sum_sq,
               given_ref_logps) -> _PairLoss:
    """Sequence statistics of ``[2R, T]`` per-token statistics (the rows of whole pairs, chosen first) and their
    loss: log-probs summed (or averaged with ``average_log_prob``; LD-DPO's token weights), TDPO's KL aggregated as
    the log-ratios are (the TDPO authors' ``_tdpo_get_batch_logps``: summed, or averaged over the kept tokens)."""
    mask = labels != config.ignore_index
    lengths = mask.sum(dim=1).to(token_logps.dtype)
    token_weights = None if config.ld_alpha is None else _ld_weights(mask, config.ld_alpha, token_logps.dtype)

    def aggregate(per_token: torch.Tensor, weights: torch.Tensor | None = token_weights) -> torch.Tensor:
        total = (per_token if weights is None else per_token * weights).sum(dim=1)
        return total / lengths.clamp(min=1) if config.average_log_prob else total

    logps = aggregate(token_logps)
    if token_ref_logps is not None:
        ref_logps = aggregate(token_ref_logps.to(logps.dtype))
    elif given_ref_logps is not None:
        ref = given_ref_logps.detach().to(logps.dtype)
        ref_logps = ref if ref.dim() == 1 else aggregate(_align_per_token(ref, labels, config) * mask)
    else:
        ref_logps = torch.zeros_like(logps)
    kl = aggregate(token_kl, None) if token_kl is not None else None

    (chosen_logps, rejected_logps), (chosen_ref, rejected_ref) = _pairs(logps), _pairs(ref_logps)
    (chosen_len, rejected_len), (chosen_kl, rejected_kl) = _pairs(lengths), _pairs(kl)
    stats = losses.PairStatistics(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_ref_logps=chosen_ref,
        rejected_ref_logps=rejected_ref,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        average_log_prob=config.average_log_prob,
        chosen_kl=chosen_kl,
        rejected_kl=rejected_kl,
    )
    pair_weights = _wpo_weights(token_logps, log_sum_sq, mask, lengths) if config.use_weighting else None
    loss, parts = losses.combined_loss(stats, config.objective, config.loss_types, config.weights, pair_weights)
    return _PairLoss(stats, loss, parts)


# --------------------------------------------------------------------------------------------- the schedules


def _eager_plan(config: DPOLossConfig, inputs: PreferenceInputs, labels: torch.Tensor, vs: VocabSlice | None,
                facts: LabelFacts | None):
    """``(groups, kernels)`` for the eager schedule, or ``None`` for the recompute schedule; the choice and its
    reason are logged at debug level. ``schedule="eager"`` raises where the eager schedule cannot run."""
    plan = _why_not_eager(config, inputs, labels, vs, facts)
    if isinstance(plan, str):
        if config.schedule == "eager" and plan != _NO_GRADIENT:  # forward only: there is no backward to schedule
            raise_value_error(f"schedule='eager' cannot run here: {plan}; use schedule='auto' or 'recompute'",
                              labels)
        if not torch.compiler.is_compiling():  # Dynamo traces no logging call
            _log.debug("fused_dpo_loss: recompute schedule (%s)", plan)
        return None
    kept = "" if plan[0].store_vocab is None else f", its store keeping about {plan[0].store_vocab} columns"
    _log.debug("fused_dpo_loss: eager schedule, %d group(s) of pairs %s%s", len(plan[0].bounds), plan[0].bounds, kept)
    return plan


_NO_GRADIENT = "no gradient is needed"


def _why_not_eager(config: DPOLossConfig, inputs: PreferenceInputs, labels: torch.Tensor, vs: VocabSlice | None,
                   facts: LabelFacts | None):
    """The eager schedule's ``(groups, tile kernels)``, or why it cannot (or should not) run: a string. ``facts``:
    the kept tokens of each row of ``labels``, read in the call's one host read."""
    if config.schedule == "recompute":
        return "schedule='recompute'"
    if inputs.policy_hidden is None:
        return "the policy is given as logits; the eager schedule is the linear path's (policy_hidden)"
    policy = (inputs.policy_hidden, inputs.lm_head_weight, inputs.lm_head_bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in policy):
        return _NO_GRADIENT
    if config.schedule == "auto" and not any(t is not None and t.requires_grad for t in policy[1:]):
        return ("the head is frozen: the recompute schedule forms the hidden states' gradient in its forward, with "
                "the same GEMMs and no tiles kept")
    if torch.compiler.is_compiling():
        return "under torch.compile the compiled ops run the recompute schedule"
    heads = [LinearHead(inputs.policy_hidden, inputs.lm_head_weight, inputs.lm_head_bias)]
    if inputs.ref_hidden is not None:
        heads.append(LinearHead(inputs.ref_hidden, inputs.ref_lm_head_weight, inputs.ref_lm_head_bias))
    kernels = dispatch.tile_kernels(heads, config.backend)
    if isinstance(kernels, str):
        return kernels
    weight = inputs.lm_head_weight
    sdt = statistics_dtype(*(t.dtype for h in heads for t in (h.hidden, h.weight)))
    # every rank of a vocabulary-parallel group must form the same groups (each one's statistics are combined
    # across the group): sized for the widest slice
    converted = [converted_operand_bytes(h.hidden, h.weight, sdt) for h in heads]  # each head's, as GEMM operands
    shared = len(heads) > 1 and heads[1].weight is heads[0].weight  # one head converted once for both
    need = EagerNeed(facts.kept_per_row, weight.shape[0] if vs is None else vs.largest, weight.shape[1], sdt,
                     keep_ref_tiles=config.uses_token_kl and inputs.ref_hidden is not None,
                     half_weight_grad=weight.requires_grad and weight.dtype != sdt,
                     converted_bytes=sum(converted[:1] if shared else converted),
                     store_dtype=linear_plan.kept_store_dtype(
                         products_now(inputs.policy_hidden, weight, sdt).operand_dtype, sdt, config.token_options),
                     grad_itemsize=weight.element_size() if weight.requires_grad else 0,
                     policy_converted_bytes=converted[0])
    groups = need.groups(need.budget_bytes(config.eager_budget_mb, weight.device))
    if isinstance(groups, str):
        return groups
    if config.schedule == "auto" and (why := estimated_slower(need, groups, heads, converted, sdt,
                                                              config.token_options, "fused_dpo_loss")):
        return why
    coupled = [n for n in config.loss_types if not losses.objective(n).pairwise]
    if coupled and len(groups.bounds) > 1:
        return (f"loss_type {coupled} couples the pairs of a batch, and the batch needs {len(groups.bounds)} groups "
                f"within eager_budget_mb")
    return groups, kernels


def _eager_statistics(config: DPOLossConfig, inputs: PreferenceInputs, labels: torch.Tensor, vs: VocabSlice | None,
                      groups, kernels):
    """``(loss, logps, ref_logps, kl, log_sum_sq)`` by the eager schedule for the (shifted) ``labels``: the loss with
    its gradients computed in the forward, and the per-token statistics ``[2B, T]`` (``logps`` and ``kl``
    differentiable)."""
    opts = config.token_options
    policy_head = _head(inputs.policy_hidden, inputs.lm_head_weight, inputs.lm_head_bias, config)
    ref_head = _head(inputs.ref_hidden, inputs.ref_lm_head_weight, inputs.ref_lm_head_bias, config)
    ref_from_logits = None
    if inputs.ref_logits is not None:
        with torch.no_grad():
            ref_from_logits = dispatch.logits_stats(_shifted_states(inputs.ref_logits, config), None, labels, opts,
                                                    config.backend, vs).logp

    def group_loss(batch_rows, logp, ref_logp, kl, logged):
        def pick(x):
            return x if batch_rows is None or x is None else x.index_select(0, batch_rows)

        part = _pair_loss(config, pick(labels), logp, ref_logp if ref_logp is not None else pick(ref_from_logits),
                          kl if config.uses_token_kl else None, None if logged is None else logged["log_sum_sq_probs"],
                          pick(inputs.ref_logps))
        return part.loss * (logp.shape[0] / labels.shape[0])

    call = EagerCall(opts, kernels, groups, keep_ref_tiles=config.uses_token_kl, logging=config.use_weighting,
                     group_loss=group_loss, vocab_slice=vs)
    loss, out = dispatch.eager_pair_stats(policy_head, ref_head, labels, call)
    ref_logps = ref_from_logits if out.ref_logp is None else out.ref_logp
    log_sum_sq = None if out.logged is None else out.logged["log_sum_sq_probs"]
    return loss, out.logp, ref_logps, (out.kl if config.uses_token_kl else None), log_sum_sq


def _ld_weights(mask: torch.Tensor, ld_alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """LD-DPO's per-token weights ``[2B, T]``: 1 for the first ``min(len_w, len_l)`` scored tokens of each response
    of a pair, ``ld_alpha`` after them (TRL's ``shared`` and ``tail`` masks; masked positions hold 0 log-probs)."""
    position = mask.cumsum(dim=1)
    chosen, rejected = mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
    one = torch.ones((), dtype=dtype, device=mask.device)
    return torch.where(position <= shared, one, one * ld_alpha)


@torch.no_grad()
def _wpo_weights(token_logps, log_sum_sq, mask, lengths) -> torch.Tensor:
    """WPO's pair weights ``[B]``: ``w_w w_l`` with ``w = exp(mean_t (logp_t - log sum_v p_v^2))`` over each
    sequence's scored tokens (TRL's ``use_weighting``), detached."""
    aligned = (token_logps - log_sum_sq.to(token_logps.dtype)) * mask
    chosen, rejected = torch.exp(aligned.sum(dim=1) / lengths.clamp(min=1)).chunk(2)
    return chosen * rejected


def _pairs(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``[2B]`` -> ``([B] chosen, [B] rejected)``."""
    return (None, None) if x is None else x.chunk(2)


def _align_per_token(ref: torch.Tensor, labels: torch.Tensor, config: DPOLossConfig) -> torch.Tensor:
    """Per-token reference log-probs given before the shift are shifted like the labels."""
    return ref[:, 1:] if config.shift and ref.shape[1] == labels.shape[1] + 1 else ref


def _token_statistics(config: DPOLossConfig, inputs: PreferenceInputs, vs: VocabSlice | None, kept: int | None):
    """The recompute schedule's per-token ``(logps, ref_logps or None, kl or None, log_sum_sq or None)``, each
    ``[2B, T]``, via the primitives; ``log_sum_sq`` (the policy's ``log sum_v p_v^2``, detached) only for
    ``use_weighting``. ``kept``: the scored labels' kept tokens, from the call's one host read."""
    token_logps, token_ref_logps, token_kl, logged = _token_statistics_and_logged(config, inputs, vs, kept)
    if not config.use_weighting:
        return token_logps, token_ref_logps, token_kl, None
    if logged is not None:  # from hidden states: out of the same fused pass
        return token_logps, token_ref_logps, token_kl, logged["log_sum_sq_probs"]
    # from logits: one more detached pass over the policy's logits
    policy_logits = _shifted_states(inputs.policy_logits, config)
    return token_logps, token_ref_logps, token_kl, log_sum_sq_probs(policy_logits, config.token_options)


def _token_statistics_and_logged(config: DPOLossConfig, inputs: PreferenceInputs, vs: VocabSlice | None,
                                  kept: int | None):
    """``(logps, ref_logps, kl, logged)``: the linear path hands the logged statistics out of its one fused pass
    when ``use_weighting`` asks for them (``logged`` is ``None`` otherwise, and from logits)."""
    opts, backend = config.token_options, config.backend
    labels = _shifted_labels(inputs.labels, config)
    policy_logits = _shifted_states(inputs.policy_logits, config)
    ref_logits = _shifted_states(inputs.ref_logits, config)
    policy_head = _head(inputs.policy_hidden, inputs.lm_head_weight, inputs.lm_head_bias, config)
    ref_head = _head(inputs.ref_hidden, inputs.ref_lm_head_weight, inputs.ref_lm_head_bias, config)

    logging = config.use_weighting and policy_head is not None
    if config.uses_token_kl and policy_logits is not None:
        out = dispatch.logits_stats(policy_logits, ref_logits, labels, opts, backend, vs)
        return out.logp, out.ref_logp, out.kl, None
    if policy_head is not None and ref_head is not None:
        # one fused call: the reference tiles beside the policy's, forward only (unless TDPO's KL needs them back)
        out = dispatch.linear_stats(policy_head, ref_head, labels, opts, backend, logging=logging, vocab_slice=vs,
                                    kept_count=kept, kl_grad=config.uses_token_kl, with_kl=config.uses_token_kl)
        return out.logp, out.ref_logp, (out.kl if config.uses_token_kl else None), out.logged
    if policy_logits is not None:
        out = dispatch.logits_stats(policy_logits, None, labels, opts, backend, vs)
    else:
        out = dispatch.linear_stats(policy_head, None, labels, opts, backend, logging=logging, vocab_slice=vs,
                                    kept_count=kept)
    ref_logps = None
    with torch.no_grad():  # the reference in its own pass, forward only
        if ref_logits is not None:
            ref_logps = dispatch.logits_stats(ref_logits, None, labels, opts, backend, vs).logp
        elif ref_head is not None:
            ref_logps = dispatch.linear_stats(ref_head, None, labels, opts, backend, vocab_slice=vs,
                                              kept_count=kept).logp
    return out.logp, ref_logps, None, out.logged


def _shifted_labels(labels: torch.Tensor, config: DPOLossConfig) -> torch.Tensor:
    """With ``shift``, position ``t`` scores the next token: drop the first label."""
    return labels[:, 1:] if config.shift else labels


def _shifted_states(x: torch.Tensor | None, config: DPOLossConfig) -> torch.Tensor | None:
    """With ``shift``, the last position scores nothing: drop it (a view, never a copy)."""
    return x[:, :-1] if config.shift and x is not None else x


def _head(hidden, weight, bias, config: DPOLossConfig) -> LinearHead | None:
    return None if hidden is None else LinearHead(_shifted_states(hidden, config), weight, bias)


def _metrics(
    stats: losses.PairStatistics,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    loss_parts: dict[str, torch.Tensor],
) -> PendingMetrics | dict[str, torch.Tensor]:
    """Batch means named as TRL logs them, plus ``logps/accuracies``, (TDPO) ``kl/*`` and, when several losses are
    combined, each one's unweighted value as ``loss/<loss_type>``; read from the device when first looked at."""
    values = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": stats.chosen_logps.detach().mean(),
        "logps/rejected": stats.rejected_logps.detach().mean(),
        "logps/accuracies": (stats.chosen_logps > stats.rejected_logps).double().mean(),
    }
    if stats.chosen_kl is not None:
        values["kl/chosen"] = stats.chosen_kl.detach().mean()
        values["kl/rejected"] = stats.rejected_kl.detach().mean()
    values.update({f"loss/{name}": part.detach() for name, part in loss_parts.items()})
    if torch.compiler.is_compiling():
        return _compiled_metrics(values)
    return PendingMetrics(values)


def _compiled_metrics(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics under torch.compile: no host sync inside a compiled graph, so 0-dim fp64 tensors."""
    return {name: v.to(torch.float64) for name, v in values.items()}


class FusedDPOLoss(nn.Module):
    """``nn.Module`` holding the options of :func:`fused_dpo_loss`; ``forward`` takes its tensor arguments.

    Example::

        criterion = FusedDPOLoss(loss_type="tdpo2", beta=0.1, alpha=0.5)
        out = criterion(labels=labels, policy_hidden=h, lm_head_weight=w, ref_hidden=h_ref, ref_lm_head_weight=w_ref)
        out.loss.backward()
    """

    @option_keywords(DPOLossConfig)
    def __init__(self, **options) -> None:
        super().__init__()
        self.config = DPOLossConfig(**options)

    def forward(self, *, labels: torch.Tensor, **tensors: torch.Tensor | None) -> DPOLossOutput:
        return compute_dpo_loss(self.config, PreferenceInputs(labels=labels, **tensors))

    def extra_repr(self) -> str:
        c = self.config
        return f"loss_type={list(c.loss_types)}, beta={c.beta}, backend={c.backend!r}"
