"""KTO (Ethayarajh et al. 2024) on the fused head: unpaired completions, each desirable or not, against a reference,
with the KL estimate TRL's ``KTOTrainer`` forms from a batch of mismatched (prompt, completion) pairs.

Per completion ``i`` (``logp_i`` the sum of its kept tokens' log-probs, ``r_i = logp_i - ref_logp_i``):

- ``loss_type="kto"``: ``z = max(0, mean_j (logp'_j - ref_logp'_j))`` over the KL batch (the mismatched pairs),
  computed without gradient; a desirable completion costs ``w_d (1 - σ(β (r_i - z)))``, an undesirable one
  ``w_u (1 - σ(β (z - r_i)))``;
- ``loss_type="apo_zero_unpaired"`` (D'Oosterlinck et al. 2024): ``w_d (1 - σ(β r_i))`` and ``w_u σ(β r_i)``, no KL
  batch;

and the loss is the mean over the completions, as TRL 1.16's ``KTOTrainer`` (``desirable_weight`` ``w_d``,
``undesirable_weight`` ``w_u``). The KL estimate is this call's batch mean; TRL also averages it over the processes
of a data-parallel run (give the same ``kl`` on every rank by all-reducing the KL batch's log-probs yourself and
passing ``kl_logps`` / ``kl_ref_logps``).

From hidden states the policy and the reference go through one fused pass of the linear path (the reference's tile
beside the policy's, the reference never read in the backward), and so does the KL batch, without gradient; from
logits, the row kernels. Nothing ``[N, T, V]`` is materialised from hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_agree, check_head, check_label_range, check_logits, check_schedule
from .ops import dispatch
from .ops.common import LinearHead
from .options import TokenOptions
from .validation import is_finite_number, require_positive

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_TOKEN_OPTIONS = ("ignore_index", "temperature", "softcap", "logit_scale", "token_chunk_size", "vocab_chunk_size",
                  "tile_budget_mb", "check_labels")


@dataclass(frozen=True)
class KTOLossOutput:
    """``loss`` (0-dim); per completion ``[N]``: ``logps`` and ``ref_logps`` (sums over kept tokens; ``logps``
    differentiable), ``rewards`` (``β r``, detached); ``kl`` (0-dim, detached; 0 for ``apo_zero_unpaired``); and
    ``metrics``: TRL's names (``kl``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``; NaN for a side with no completion in the batch, which TRL does not log) as
    0-dim detached tensors, read without a host sync until you look."""

    loss: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, torch.Tensor]


def fused_kto_loss(
    *,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    policy_logits: torch.Tensor | None = None,
    policy_hidden: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    ref_lm_head_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    kl_policy_logits: torch.Tensor | None = None,
    kl_policy_hidden: torch.Tensor | None = None,
    kl_ref_logits: torch.Tensor | None = None,
    kl_ref_hidden: torch.Tensor | None = None,
    kl_logps: torch.Tensor | None = None,
    kl_ref_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    shift: bool = False,
    backend: str = "auto",
    schedule: str = "auto",
    eager_budget_mb: float | None = None,
    **options,
) -> KTOLossOutput:
    """The KTO loss of ``N`` unpaired completions (this module's docstring).

    ``labels [N, T]`` (``ignore_index`` on prompt and padding), ``desirable [N]`` bool. Policy: ``policy_logits
    [N, T, V]``, or ``policy_hidden [N, T, D]`` with ``lm_head_weight [V, D]`` (and ``lm_head_bias``). Reference:
    ``ref_logits``, ``ref_hidden`` with ``ref_lm_head_weight`` (and ``ref_lm_head_bias``), or precomputed
    ``ref_logps [N]``. The KL batch (``loss_type="kto"``): ``kl_labels [M, T']`` with ``kl_policy_logits`` or
    ``kl_policy_hidden`` (through the policy's head) and ``kl_ref_logits`` or ``kl_ref_hidden`` (through the
    reference's head); or its sequence log-probs ``kl_logps`` and ``kl_ref_logps [M]``; or the estimate itself,
    ``kl`` (a number or a 0-dim tensor, used as given, without gradient: e.g. one all-reduced over the ranks).
    ``shift=True``: position ``t`` scores ``labels[:, t + 1]`` (Hugging Face labels). Options: ``ignore_index``,
    ``temperature``, ``softcap``, ``logit_scale``, ``token_chunk_size``, ``vocab_chunk_size``, ``tile_budget_mb``,
    ``check_labels``, as on the primitives; ``backend``; ``schedule`` and ``eager_budget_mb`` for a trainable head
    from hidden states, as on :func:`dpo_kernels.linear_token_logprobs` (``"auto"``: the per-token eager schedule
    where it is estimated faster on an accelerator).
    """
    unknown = sorted(set(options) - set(_TOKEN_OPTIONS))
    if unknown:
        raise TypeError(f"fused_kto_loss got unexpected keyword argument(s) {unknown}; options: {_TOKEN_OPTIONS}")
    opts = TokenOptions(**options)
    check_schedule(schedule, eager_budget_mb)
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    require_positive("beta", beta)
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (is_finite_number(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a [N, T] tensor of token ids, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or desirable.shape != labels.shape[:1]:
        got = (f"{desirable.dtype} of shape {tuple(desirable.shape)}" if isinstance(desirable, torch.Tensor)
               else repr(desirable))
        raise ValueError(f"desirable must be a bool tensor of shape [N] = [{labels.shape[0]}] (True: a desirable "
                         f"completion), got {got}")
    if desirable.device != labels.device:
        raise ValueError(f"desirable must be on labels' device {labels.device}, got {desirable.device}")

    policy = _Side("policy", policy_logits, policy_hidden, lm_head_weight, lm_head_bias)
    ref = _Side("ref", ref_logits, ref_hidden, ref_lm_head_weight, ref_lm_head_bias)
    policy.require("policy", "policy_logits, or policy_hidden with lm_head_weight")
    if ref.given == (ref_logps is not None):
        raise ValueError("give the reference as exactly one of ref_logits, ref_hidden with ref_lm_head_weight, or "
                         "ref_logps [N]")
    logps, ref_seq = _sequence_logps(policy, ref if ref.given else None, labels, opts, backend, shift, grad=True,
                                     schedule=(schedule, eager_budget_mb))
    if ref_logps is not None:
        ref_seq = _precomputed("ref_logps", ref_logps, labels.shape[0], logps)

    if kl is not None:
        if loss_type != "kto":
            raise ValueError(f"kl is KTO's estimate; loss_type={loss_type!r} takes none")
        if not (is_finite_number(kl) or (isinstance(kl, torch.Tensor) and kl.dim() == 0)):
            raise ValueError(f"kl must be a finite number or a 0-dim tensor, got {kl!r}")
        kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
    elif loss_type != "kto":
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    else:
        kl = _kl_estimate(policy, ref, kl_labels, kl_policy_logits, kl_policy_hidden, kl_ref_logits, kl_ref_hidden,
                          kl_logps, kl_ref_logps, opts, backend, shift, logps)
    logratios = logps - ref_seq
    # TRL's 1 - σ(x) as σ(-x), and σ as exp(logσ): the same values, but neither the forward's 1 - σ nor sigmoid's
    # backward σ (1 - σ) cancels near σ = 1 (in fp32 that cost three digits of the gradient at |x| ~ 10)
    if loss_type == "kto":
        chosen = torch.exp(F.logsigmoid(beta * (kl - logratios)))
        rejected = torch.exp(F.logsigmoid(beta * (logratios - kl)))
    else:
        chosen = torch.exp(F.logsigmoid(-beta * logratios))
        rejected = torch.exp(F.logsigmoid(beta * logratios))
    per_completion = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    rewards = (beta * logratios).detach()
    return KTOLossOutput(per_completion.mean(), logps, ref_seq.detach(), rewards, kl, _metrics(rewards, logps, kl,
                                                                                              desirable))


@dataclass(frozen=True)
class _Side:
    """One model's inputs: logits, or hidden states through a head."""

    name: str
    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def given(self) -> bool:
        return self.logits is not None or self.hidden is not None

    def require(self, what: str, forms: str) -> None:
        if (self.logits is None) == (self.hidden is None):
            raise ValueError(f"give the {what} as exactly one of {forms}")
        if self.hidden is not None and self.weight is None:
            head = "lm_head_weight" if self.name == "policy" else "ref_lm_head_weight"
            raise ValueError(f"{self.name}_hidden needs its head: {head}")

    def with_inputs(self, logits, hidden) -> "_Side":
        return _Side(self.name, logits, hidden, self.weight, self.bias)


def _shifted(x: torch.Tensor | None, shift: bool) -> torch.Tensor | None:
    return x if x is None or not shift else x[:, :-1]


def _sequence_logps(policy: _Side, ref: _Side | None, labels: torch.Tensor, opts: TokenOptions, backend: str,
                    shift: bool, grad: bool, schedule: tuple[str, float | None] = ("recompute", None)
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logps [N], ref_logps [N] or None)``: sums over the kept tokens; the policy and the reference in one pass
    (from hidden states: one fused pass of the linear path, ``schedule = (schedule, eager_budget_mb)`` for a trainable
    head; no KL is computed, so the reference is not read in the backward)."""
    targets = labels[:, 1:] if shift else labels
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if policy.hidden is not None:
            if ref is not None and ref.hidden is None:
                raise ValueError("the reference must come in the policy's form: ref_hidden with ref_lm_head_weight "
                                 "beside policy_hidden (or precomputed ref_logps)")
            head = LinearHead(_shifted(policy.hidden, shift), policy.weight, policy.bias)
            check_head(("hidden", head.hidden), ("weight", head.weight), ("bias", head.bias), targets)
            ref_head = None
            if ref is not None:
                ref_head = LinearHead(_shifted(ref.hidden, shift).detach(), ref.weight.detach(),
                                      None if ref.bias is None else ref.bias.detach())
                check_head(("ref_hidden", ref_head.hidden), ("ref_lm_head_weight", ref_head.weight),
                           ("ref_lm_head_bias", ref_head.bias), targets)
                check_agree(policy_hidden=head.hidden, ref_hidden=ref_head.hidden)
            facts = check_label_range(targets, head.weight.shape[0], opts, counts=True)
            out = dispatch.linear_stats(head, ref_head, targets, opts, backend, kl_grad=False, with_kl=False,
                                        kept_count=None if facts is None else facts.kept, schedule=schedule[0],
                                        eager_budget_mb=schedule[1])
        else:
            if ref is not None and ref.logits is None:
                raise ValueError("the reference must come in the policy's form: ref_logits beside policy_logits (or "
                                 "precomputed ref_logps)")
            logits = _shifted(policy.logits, shift)
            check_logits("logits", logits, targets)
            ref_logits = None
            if ref is not None:
                ref_logits = _shifted(ref.logits, shift).detach()
                check_logits("ref_logits", ref_logits, targets)
            check_label_range(targets, logits.shape[-1], opts)
            out = dispatch.logits_stats(logits, ref_logits, targets, opts, backend, None)
    return out.logp.sum(-1), None if out.ref_logp is None else out.ref_logp.sum(-1)


def _precomputed(name: str, value: torch.Tensor, n: int | str, like: torch.Tensor) -> torch.Tensor:
    """``value`` checked to be ``[n]`` sequence log-probs (``n`` a name: any one length), detached in ``like``'s
    dtype and device."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or (isinstance(n, int) and value.shape[0] != n):
        raise ValueError(f"{name} must be a [{n}] tensor of sequence log-probs (summed over kept tokens), got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return value.detach().to(device=like.device, dtype=like.dtype)


def _kl_estimate(policy: _Side, ref: _Side, kl_labels, kl_policy_logits, kl_policy_hidden, kl_ref_logits,
                 kl_ref_hidden, kl_logps, kl_ref_logps, opts, backend, shift, like) -> torch.Tensor:
    """TRL's ``kl = max(0, mean(logp' - ref_logp'))`` over the KL batch, without gradient."""
    if kl_logps is not None or kl_ref_logps is not None:
        if kl_logps is None or kl_ref_logps is None:
            raise ValueError("give both kl_logps and kl_ref_logps, or the KL batch's inputs")
        policy_seq = _precomputed("kl_logps", kl_logps, "M", like)
        values = policy_seq - _precomputed("kl_ref_logps", kl_ref_logps, policy_seq.shape[0], like)
    else:
        if kl_labels is None:
            raise ValueError("loss_type='kto' estimates its KL term from a batch of mismatched (prompt, completion) "
                             "pairs: give kl_labels with kl_policy_logits or kl_policy_hidden and kl_ref_logits or "
                             "kl_ref_hidden (or kl_logps and kl_ref_logps); loss_type='apo_zero_unpaired' needs none")
        kl_policy = policy.with_inputs(kl_policy_logits, kl_policy_hidden)
        kl_policy.require("KL batch's policy", "kl_policy_logits, or kl_policy_hidden (through lm_head_weight)")
        kl_ref = ref.with_inputs(kl_ref_logits, kl_ref_hidden)
        if not kl_ref.given:
            raise ValueError("the KL batch needs its reference: kl_ref_logits or kl_ref_hidden (through "
                             "ref_lm_head_weight), or kl_logps and kl_ref_logps")
        if kl_ref.hidden is not None and kl_ref.weight is None:
            raise ValueError("kl_ref_hidden goes through the reference's head: give ref_lm_head_weight")
        policy_seq, ref_seq = _sequence_logps(kl_policy, kl_ref, kl_labels, opts, backend, shift, grad=False)
        values = policy_seq - ref_seq
    return values.mean().detach().clamp(min=0)


def _metrics(rewards: torch.Tensor, logps: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor) -> dict:
    """TRL's KTO metrics as 0-dim tensors: each side's mean over its completions (NaN for a side without any)."""
    count_d, count_u = desirable.sum(), (~desirable).sum()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)

    def side_mean(x, mask, count):
        return torch.where(mask, x.detach(), zero).sum() / count

    chosen_r, rejected_r = side_mean(rewards, desirable, count_d), side_mean(rewards, ~desirable, count_u)
    return {"kl": kl, "rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
            "rewards/margins": chosen_r - rejected_r, "logps/chosen": side_mean(logps, desirable, count_d),
            "logps/rejected": side_mean(logps, ~desirable, count_u)}
