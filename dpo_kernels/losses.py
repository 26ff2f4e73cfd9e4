"""Pair objectives (MATH.md §3) on per-sequence statistics. Pure PyTorch on ``[B]`` tensors; no kernels.

``OBJECTIVES`` maps each ``loss_type`` to its function and what it needs; adding a loss is one function and one row.
Every function takes :class:`PairStatistics` and :class:`ObjectiveConfig` and returns the per-pair loss ``[B]``.
``logσ`` is always ``F.logsigmoid`` (a stable softplus), never ``log(sigmoid(x))``.

Sources: DPO (Rafailov et al. 2023), conservative DPO (label smoothing, Mitchell 2023), robust DPO (Chowdhury et al.
2024), hinge / SLiC (Zhao et al. 2023), IPO (Azar et al. 2023), EXO (Ji et al. 2024), NCA (Chen et al. 2024), BCO
pair (Jung et al. 2024), SPPO hard (Wu et al. 2024), AOT (Melnyk et al. 2024), APO (D'Oosterlinck et al. 2024),
DiscoPOP (Chris Lu et al. 2024), SimPO (Meng et al. 2024), TDPO (Zeng et al. 2024), f-DPO (Wang et al. 2023); the
exact forms (length normalisation of IPO and ``sigmoid_norm``, hard SPPO, BCO pair without a running mean) follow
TRL 1.16's ``DPOTrainer``, so that results carry over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp() arguments are clamped here in the f-divergence scores so that extreme log-ratios stay finite (as TRL does
# for the alpha divergence); the clamp is far beyond any log-ratio a trained model produces.
_EXP_CLAMP = 80.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyper-parameters of the objectives; see ``fused_dpo_loss`` for their meaning and defaults."""

    beta: float = 0.1
    alpha: float = 0.5
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    cpo_alpha: float = 1.0
    alphapo_alpha: float = 0.0


@dataclass(frozen=True)
class PairStatistics:
    """Per-sequence statistics of ``B`` pairs, every field ``[B]`` (``w`` chosen, ``l`` rejected).

    ``*_logps`` and ``*_ref_logps`` are aggregated as the caller asked (sum, or mean when ``average_log_prob``);
    ``*_lengths`` count unmasked tokens; ``*_kl`` are the per-token KLs aggregated as the log-probs are (summed, or
    averaged when ``average_log_prob``; ``None`` without token-level KL).
    A reference-free setup passes zeros as reference log-probs.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_ref_logps: torch.Tensor
    rejected_ref_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    average_log_prob: bool = False
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.chosen_ref_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.rejected_ref_logps

    def per_token_mean(self, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalise two aggregated statistics (a no-op when they are already means)."""
        if self.average_log_prob:
            return chosen, rejected
        return chosen / self.chosen_lengths.clamp(min=1), rejected / self.rejected_lengths.clamp(min=1)

    def per_token_sum(self, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo the length normalisation of two aggregated statistics (a no-op when they are sums)."""
        if not self.average_log_prob:
            return chosen, rejected
        return chosen * self.chosen_lengths, rejected * self.rejected_lengths


# --------------------------------------------------------------------------------------------- f-divergences


def f_divergence_scores(logratios: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """``f'(π/π_ref)`` of the f-DPO paper applied to log-ratios; ``reverse_kl`` is the identity (standard DPO)."""
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(torch.clamp(-logratios, max=_EXP_CLAMP))
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2.0) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(α-1) - 1) / (α - 1); α -> 1 is reverse KL
        a = cfg.f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        return torch.expm1(torch.clamp((a - 1.0) * logratios, max=_EXP_CLAMP)) / (a - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")


def _delta_score(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return f_divergence_scores(s.chosen_logratios, cfg) - f_divergence_scores(s.rejected_logratios, cfg)


def _length_normalised_delta_score(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """Scores of the summed log-ratios divided by the token counts (IPO and ``sigmoid_norm``, as TRL)."""
    w, l = s.per_token_sum(s.chosen_logratios, s.rejected_logratios)
    w_score, l_score = f_divergence_scores(w, cfg), f_divergence_scores(l, cfg)
    return w_score / s.chosen_lengths.clamp(min=1) - l_score / s.rejected_lengths.clamp(min=1)


def _smoothed_logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-ε) logσ(x) - ε logσ(-x)``: the logistic loss with label smoothing."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-x)


# --------------------------------------------------------------------------------------------- objectives


def sigmoid_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return _smoothed_logistic(cfg.beta * _delta_score(s, cfg), cfg.label_smoothing)


def robust_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    x, eps = cfg.beta * _delta_score(s, cfg), cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def hinge_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return torch.relu(1 - cfg.beta * _delta_score(s, cfg))


def ipo_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return (_length_normalised_delta_score(s, cfg) - 1 / (2 * cfg.beta)) ** 2


def exo_pair_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """KL between ``softmax(β r)`` over the pair and the smoothed label ``[1-ε, ε]`` (EXO, K=2)."""
    x, eps = cfg.beta * _delta_score(s, cfg), cfg.label_smoothing
    chosen = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
    rejected = torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
    return chosen + rejected


def nca_pair_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    w, l = cfg.beta * s.chosen_logratios, cfg.beta * s.rejected_logratios
    return -F.logsigmoid(w) - 0.5 * F.logsigmoid(-w) - 0.5 * F.logsigmoid(-l)


def bco_pair_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return -F.logsigmoid(cfg.beta * s.chosen_logratios) - F.logsigmoid(-cfg.beta * s.rejected_logratios)


def sppo_hard_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    half_inv_beta = 0.5 / cfg.beta
    return (s.chosen_logratios - half_inv_beta) ** 2 + (s.rejected_logratios + half_inv_beta) ** 2


def aot_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """Paired AOT: sorted policy log-ratio margins against sorted reference margins (sorted over the batch)."""
    policy = torch.sort(s.chosen_logps - s.rejected_logps).values
    ref = torch.sort(s.chosen_ref_logps - s.rejected_ref_logps).values
    return _smoothed_logistic(cfg.beta * (policy - ref), cfg.label_smoothing)


def aot_unpaired_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    delta = torch.sort(s.chosen_logratios).values - torch.sort(s.rejected_logratios).values
    return _smoothed_logistic(cfg.beta * delta, cfg.label_smoothing)


def apo_zero_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return 1 - torch.sigmoid(cfg.beta * s.chosen_logratios) + torch.sigmoid(cfg.beta * s.rejected_logratios)


def apo_down_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    w, l = s.chosen_logratios, s.rejected_logratios
    return torch.sigmoid(cfg.beta * w) + 1 - torch.sigmoid(cfg.beta * (w - l))


def discopop_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """``-logσ(x) σ(-x/τ) + e^{-x} σ(x/τ)`` with ``x = βΔ``; the second term is ``exp(-x + logσ(x/τ))`` so that a
    very negative ``x`` (where the mixing weight is 0) gives 0, not ``inf * 0``."""
    x, tau = cfg.beta * _delta_score(s, cfg), cfg.discopop_tau
    return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(-x + F.logsigmoid(x / tau))


def sigmoid_norm_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    return -F.logsigmoid(cfg.beta * _length_normalised_delta_score(s, cfg))


def simpo_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """Reference-free: ``-logσ(β (ā_w - ā_l) - γ)`` on mean per-token log-probs, label smoothing as in CPO."""
    w, l = s.per_token_mean(s.chosen_logps, s.rejected_logps)
    return _smoothed_logistic(cfg.beta * (w - l) - cfg.simpo_gamma, cfg.label_smoothing)


def tdpo1_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    delta = s.chosen_logratios - s.rejected_logratios
    return -F.logsigmoid(cfg.beta * (delta - (s.rejected_kl - s.chosen_kl)))


def tdpo2_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    delta = s.chosen_logratios - s.rejected_logratios
    return -F.logsigmoid(cfg.beta * (delta - cfg.alpha * (s.rejected_kl - s.chosen_kl.detach())))


def sft_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """NLL of the chosen responses, averaged over all their tokens (one value, broadcast to ``[B]``)."""
    chosen_sum, _ = s.per_token_sum(s.chosen_logps, s.rejected_logps)
    nll = -chosen_sum.sum() / s.chosen_lengths.sum().clamp(min=1)
    return nll.expand(chosen_sum.shape[0])


# The largest mean log-prob ORPO's odds take: a mean of 0 or above (every token certain, or a rounding artefact) has
# infinite odds, whose logσ has a NaN gradient (0 * inf); below -1e-7 nothing changes.
ORPO_MAX_MEAN_LOGP = -1e-7


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, without cancellation: ``log(-expm1(x))`` near 0, ``log1p(-e^x)`` below
    ``-ln 2``."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: the chosen responses' NLL (mean over their kept tokens, as ``sft``)
    minus ``β logσ(log_odds)``, ``log_odds = (ā_w - ā_l) - (log(1 - e^{ā_w}) - log(1 - e^{ā_l}))`` on the mean
    per-token log-probs ``ā`` (TRL 1.16's ``ORPOTrainer.odds_ratio_loss``, whose ``β`` is the paper's λ)."""
    w, l = s.per_token_mean(s.chosen_logps, s.rejected_logps)
    w, l = w.clamp(max=ORPO_MAX_MEAN_LOGP), l.clamp(max=ORPO_MAX_MEAN_LOGP)
    log_odds = (w - l) - (log1mexp(w) - log1mexp(l))
    return sft_loss(s, cfg) - cfg.beta * F.logsigmoid(log_odds)


def cpo_loss(s: PairStatistics, cfg: ObjectiveConfig) -> torch.Tensor:
    """CPO (Xu et al. 2024), reference-free: ``-(1-ε) logσ(β (logp_w - logp_l)) - ε logσ(-β (...))`` plus
    ``cpo_alpha`` times the chosen responses' NLL (TRL 1.16's ``CPOTrainer`` with ``loss_type="sigmoid"``); with
    ``alphapo_alpha = α != 0`` the log-probs are replaced by AlphaPO's rewards ``(1 - p^{-α}) / α`` (TRL's CPO
    ``alpha``; Gupta et al. 2025); its ``hinge``, ``ipo`` and ``simpo`` variants are those reference-free
    objectives combined with ``sft`` (``loss_type=["simpo", "sft"], loss_weights=[1, cpo_alpha],
    reference_free=True``)."""
    if cfg.alphapo_alpha == 0:
        logits = s.chosen_logps - s.rejected_logps
    else:  # AlphaPO's reward (1 - p^-α) / α of each response's probability p, as e^{-α logp}: never 0^-α
        a = cfg.alphapo_alpha
        logits = (torch.expm1(-a * s.rejected_logps) - torch.expm1(-a * s.chosen_logps)) / a
    return _smoothed_logistic(cfg.beta * logits, cfg.label_smoothing) + cfg.cpo_alpha * sft_loss(s, cfg)


# --------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Smoothing:
    """Allowed ``label_smoothing`` range of a loss: ``low <= ε`` (or ``<``) and ``ε < high`` (or ``<=``)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = True

    def contains(self, eps: float) -> bool:
        above = eps > self.low if self.low_open else eps >= self.low
        below = eps < self.high if self.high_open else eps <= self.high
        return above and below

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Objective:
    """One ``loss_type``: its function and what it needs from the caller."""

    fn: Callable[[PairStatistics, ObjectiveConfig], torch.Tensor]
    uses_reference: bool = True
    uses_token_kl: bool = False
    smoothing: Smoothing | None = None  # None: label_smoothing is not used
    f_divergence: bool = False  # accepts f_divergence_type other than reverse_kl
    pairwise: bool = True  # each pair's loss depends on that pair alone (False: it couples the pairs of a batch)


_CONSERVATIVE = Smoothing(0.0, 0.5, high_open=False)

OBJECTIVES: dict[str, Objective] = {
    "sigmoid": Objective(sigmoid_loss, smoothing=_CONSERVATIVE, f_divergence=True),
    "robust": Objective(robust_loss, smoothing=Smoothing(0.0, 0.5), f_divergence=True),
    "hinge": Objective(hinge_loss, f_divergence=True),
    "ipo": Objective(ipo_loss, f_divergence=True),
    "exo_pair": Objective(exo_pair_loss, smoothing=Smoothing(0.0, 1.0, low_open=True), f_divergence=True),
    "nca_pair": Objective(nca_pair_loss),
    "bco_pair": Objective(bco_pair_loss),
    "sppo_hard": Objective(sppo_hard_loss),
    "aot": Objective(aot_loss, smoothing=_CONSERVATIVE, pairwise=False),
    "aot_unpaired": Objective(aot_unpaired_loss, smoothing=_CONSERVATIVE, pairwise=False),
    "apo_zero": Objective(apo_zero_loss),
    "apo_down": Objective(apo_down_loss),
    "discopop": Objective(discopop_loss, f_divergence=True),
    "sigmoid_norm": Objective(sigmoid_norm_loss, f_divergence=True),
    "simpo": Objective(simpo_loss, uses_reference=False, smoothing=_CONSERVATIVE),
    "tdpo1": Objective(tdpo1_loss, uses_token_kl=True),
    "tdpo2": Objective(tdpo2_loss, uses_token_kl=True),
    "sft": Objective(sft_loss, uses_reference=False, f_divergence=True, pairwise=False),
    # ORPO's and CPO's NLL is a mean over the batch's chosen tokens: they couple the pairs
    "orpo": Objective(orpo_loss, uses_reference=False, pairwise=False),
    "cpo": Objective(cpo_loss, uses_reference=False, smoothing=_CONSERVATIVE, pairwise=False),
}


def objective(loss_type: str) -> Objective:
    try:
        return OBJECTIVES[loss_type]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {sorted(OBJECTIVES)} (or a list of them), got {loss_type!r}") from None


def combined_loss(
    stats: PairStatistics, cfg: ObjectiveConfig, loss_types: tuple[str, ...], loss_weights: tuple[float, ...],
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_k w_k * mean_pairs(c * loss_k)`` with per-pair weights ``c [B]`` (WPO; 1 when ``None``); also returns
    each loss's batch mean, keyed by its ``loss_type``."""
    def per_pair(name: str) -> torch.Tensor:
        loss = objective(name).fn(stats, cfg)
        return loss if pair_weights is None else loss * pair_weights

    parts = {name: per_pair(name).mean() for name in loss_types}
    total = sum(w * parts[name] for name, w in zip(loss_types, loss_weights, strict=True))
    return total, parts


def rewards(stats: PairStatistics, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``β r`` per side (``β (r + K)`` when token-level KL is present, as TDPO logs), detached."""
    chosen, rejected = stats.chosen_logratios, stats.rejected_logratios
    if stats.chosen_kl is not None:
        chosen, rejected = chosen + stats.chosen_kl, rejected + stats.rejected_kl
    return cfg.beta * chosen.detach(), cfg.beta * rejected.detach()
