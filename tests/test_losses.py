"""Every objective against an independent float64 NumPy closed form (MATH.md §3 and TRL 1.16's definitions),
for β from 1e-3 to 10 and log-ratios up to ±1e4, with finite values and gradients."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dpo_kernels import losses
from dpo_kernels.losses import ObjectiveConfig, PairStatistics


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def smoothed(x, eps):
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def fscore(r, kind, a=0.5):
    if kind == "reverse_kl":
        return r
    if kind == "forward_kl":
        return 1 - np.exp(np.minimum(-r, 80.0))
    if kind == "js_divergence":
        return math.log(2) + log_sigmoid(r)
    return (np.exp(np.minimum((a - 1) * r, 80.0)) - 1) / (a - 1)


def numpy_loss(name: str, s: dict, c: ObjectiveConfig) -> np.ndarray:
    """Closed forms, written from the papers / TRL, on sums (``average_log_prob=False``)."""
    b, eps = c.beta, c.label_smoothing
    rw, rl = s["w"] - s["rw"], s["l"] - s["rl"]
    lw, ll = s["len_w"], s["len_l"]
    d = fscore(rw, c.f_divergence_type, c.f_alpha_divergence_coef) - fscore(rl, c.f_divergence_type, c.f_alpha_divergence_coef)
    dn = fscore(rw, c.f_divergence_type, c.f_alpha_divergence_coef) / lw - fscore(
        rl, c.f_divergence_type, c.f_alpha_divergence_coef
    ) / ll
    if name == "sigmoid":
        return smoothed(b * d, eps)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(b * d) + eps * log_sigmoid(-b * d)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1 - b * d)
    if name == "ipo":
        return (dn - 1 / (2 * b)) ** 2
    if name == "exo_pair":
        return sigmoid(b * d) * (log_sigmoid(b * d) - np.log(1 - eps)) + sigmoid(-b * d) * (
            log_sigmoid(-b * d) - np.log(eps)
        )
    if name == "nca_pair":
        return -log_sigmoid(b * rw) - 0.5 * log_sigmoid(-b * rw) - 0.5 * log_sigmoid(-b * rl)
    if name == "bco_pair":
        return -log_sigmoid(b * rw) - log_sigmoid(-b * rl)
    if name == "sppo_hard":
        return (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2
    if name == "aot":
        return smoothed(b * (np.sort(s["w"] - s["l"]) - np.sort(s["rw"] - s["rl"])), eps)
    if name == "aot_unpaired":
        return smoothed(b * (np.sort(rw) - np.sort(rl)), eps)
    if name == "apo_zero":
        return 1 - sigmoid(b * rw) + sigmoid(b * rl)
    if name == "apo_down":
        return sigmoid(b * rw) + 1 - sigmoid(b * (rw - rl))
    if name == "discopop":
        x, tau = b * d, c.discopop_tau
        mix = sigmoid(x / tau)
        with np.errstate(over="ignore", invalid="ignore"):
            exp_part = np.where(mix == 0, 0.0, np.exp(-x) * mix)  # weight 0 -> the exponential term is absent
        return -log_sigmoid(x) * (1 - mix) + exp_part
    if name == "sigmoid_norm":
        return -log_sigmoid(b * dn)
    if name == "simpo":
        return smoothed(b * (s["w"] / lw - s["l"] / ll) - c.simpo_gamma, eps)
    if name == "tdpo1":
        return -log_sigmoid(b * ((rw - rl) - (s["kl_l"] - s["kl_w"])))
    if name == "tdpo2":
        return -log_sigmoid(b * ((rw - rl) - c.alpha * (s["kl_l"] - s["kl_w"])))
    nll = -s["w"].sum() / lw.sum()
    if name == "sft":
        return np.full_like(rw, nll)
    if name == "orpo":  # mean log-probs, clamped below 0 (losses.ORPO_MAX_MEAN_LOGP)
        aw, al = np.minimum(s["w"] / lw, -1e-7), np.minimum(s["l"] / ll, -1e-7)
        log_odds = (aw - al) - (np.log(-np.expm1(aw)) - np.log(-np.expm1(al)))
        return nll - b * log_sigmoid(log_odds)
    if name == "cpo":
        if c.alphapo_alpha:
            a = c.alphapo_alpha
            return smoothed(b * (np.expm1(-a * s["l"]) - np.expm1(-a * s["w"])) / a, eps) + c.cpo_alpha * nll
        return smoothed(b * (s["w"] - s["l"]), eps) + c.cpo_alpha * nll
    raise KeyError(name)


def _stats(values: dict, requires_grad: bool = True) -> tuple[PairStatistics, dict[str, torch.Tensor]]:
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad and k not in ("len_w", "len_l"))
              for k, v in values.items()}
    stats = PairStatistics(
        chosen_logps=leaves["w"],
        rejected_logps=leaves["l"],
        chosen_ref_logps=leaves["rw"],
        rejected_ref_logps=leaves["rl"],
        chosen_lengths=leaves["len_w"],
        rejected_lengths=leaves["len_l"],
        chosen_kl=leaves["kl_w"],
        rejected_kl=leaves["kl_l"],
    )
    return stats, leaves


def _values(rng: np.random.Generator, spread: float, b: int = 6) -> dict[str, np.ndarray]:
    return {
        "w": -np.abs(rng.normal(50, 20, b)) + rng.normal(0, spread, b),
        "l": -np.abs(rng.normal(50, 20, b)) + rng.normal(0, spread, b),
        "rw": -np.abs(rng.normal(50, 20, b)),
        "rl": -np.abs(rng.normal(50, 20, b)),
        "len_w": rng.integers(1, 40, b).astype(np.float64),
        "len_l": rng.integers(1, 40, b).astype(np.float64),
        "kl_w": np.abs(rng.normal(3, 2, b)),
        "kl_l": np.abs(rng.normal(3, 2, b)),
    }


def _config(name: str, beta: float, **kw) -> ObjectiveConfig:
    eps = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "aot": 0.05, "simpo": 0.05, "cpo": 0.1}.get(name, 0.0)
    return ObjectiveConfig(beta=beta, label_smoothing=eps, **kw)


BETAS = [1e-3, 1e-2, 0.1, 1.0, 10.0]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", sorted(losses.OBJECTIVES))
def test_objective_matches_closed_form(name, beta):
    values = _values(np.random.default_rng(0), spread=5.0)
    _assert_closed_form_and_finite_gradients(name, values, _config(name, beta))


def _assert_closed_form_and_finite_gradients(name, values, cfg, finite_values=False):
    stats, leaves = _stats(values)
    got = losses.objective(name).fn(stats, cfg)
    if finite_values:
        assert torch.isfinite(got).all(), f"{name}: non-finite value {got}"
    expected = numpy_loss(name, values, cfg)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    got.sum().backward()
    for k, leaf in leaves.items():
        if leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all(), f"{name}: non-finite gradient for {k}"


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", sorted(losses.OBJECTIVES))
def test_objective_extreme_logratios_stay_finite(name, beta, sign):
    """Log-ratios of ±1e4: values equal the closed form where it is finite, and nothing is NaN or inf."""
    values = _values(np.random.default_rng(1), spread=0.0, b=4)
    values["w"] = values["rw"] + sign * 1e4
    values["l"] = values["rl"] - sign * 1e4
    _assert_closed_form_and_finite_gradients(name, values, _config(name, beta), finite_values=True)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", sorted(n for n, o in losses.OBJECTIVES.items() if o.f_divergence and n != "sft"))
def test_f_divergence_variants(name, kind):
    for spread in (5.0, 1e4):
        values = _values(np.random.default_rng(2), spread=spread)
        cfg = _config(name, 0.1, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
        stats, _ = _stats(values, requires_grad=False)
        got = losses.objective(name).fn(stats, cfg).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, numpy_loss(name, values, cfg), rtol=1e-10, atol=1e-12)


def test_alpha_divergence_at_one_is_reverse_kl():
    values = _values(np.random.default_rng(3), spread=5.0)
    stats, _ = _stats(values, requires_grad=False)
    a = losses.sigmoid_loss(stats, ObjectiveConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0))
    b = losses.sigmoid_loss(stats, ObjectiveConfig())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    """TDPO2: d/dK_w = 0 exactly, d/dK_l = β α σ(-z); TDPO1: d/dK_w = -β σ(-z), d/dK_l = β σ(-z)."""
    values = _values(np.random.default_rng(4), spread=5.0, b=1)
    beta, alpha = 0.3, 0.7
    cfg = ObjectiveConfig(beta=beta, alpha=alpha)
    rw, rl = values["w"][0] - values["rw"][0], values["l"][0] - values["rl"][0]
    kw, kl = values["kl_w"][0], values["kl_l"][0]

    stats, leaves = _stats(values)
    losses.tdpo2_loss(stats, cfg).sum().backward()
    z2 = beta * ((rw - rl) - alpha * (kl - kw))
    assert leaves["kl_w"].grad is None, "sg(K_w): the chosen KL must not be in the graph"
    assert leaves["kl_l"].grad.item() == pytest.approx(beta * alpha * _sigma(-z2), rel=1e-12)

    stats, leaves = _stats(values)
    losses.tdpo1_loss(stats, cfg).sum().backward()
    z1 = beta * ((rw - rl) - (kl - kw))
    assert leaves["kl_w"].grad.item() == pytest.approx(-beta * _sigma(-z1), rel=1e-12)
    assert leaves["kl_l"].grad.item() == pytest.approx(beta * _sigma(-z1), rel=1e-12)


def test_sigmoid_gradient_closed_form():
    """dL/dlogp_w = -β ((1-ε) σ(-x) - ε σ(x)) for the conservative DPO loss, x = βΔ."""
    values = _values(np.random.default_rng(5), spread=5.0, b=1)
    beta, eps = 0.02, 0.1
    stats, leaves = _stats(values)
    losses.sigmoid_loss(stats, ObjectiveConfig(beta=beta, label_smoothing=eps)).sum().backward()
    x = beta * ((values["w"][0] - values["rw"][0]) - (values["l"][0] - values["rl"][0]))
    expected = -beta * ((1 - eps) * _sigma(-x) - eps * _sigma(x))
    assert leaves["w"].grad.item() == pytest.approx(expected, rel=1e-12)
    assert leaves["l"].grad.item() == pytest.approx(-expected, rel=1e-12)


def test_average_log_prob_makes_ipo_and_simpo_use_the_same_means():
    """IPO and SimPO always use per-token means; the aggregation the caller chose must not change them."""
    values = _values(np.random.default_rng(6), spread=5.0)
    sums, _ = _stats(values, requires_grad=False)
    means = PairStatistics(
        chosen_logps=sums.chosen_logps / sums.chosen_lengths,
        rejected_logps=sums.rejected_logps / sums.rejected_lengths,
        chosen_ref_logps=sums.chosen_ref_logps / sums.chosen_lengths,
        rejected_ref_logps=sums.rejected_ref_logps / sums.rejected_lengths,
        chosen_lengths=sums.chosen_lengths,
        rejected_lengths=sums.rejected_lengths,
        average_log_prob=True,
    )
    cfg = ObjectiveConfig(beta=0.1)
    for fn in (losses.ipo_loss, losses.simpo_loss, losses.sigmoid_norm_loss, losses.sft_loss):
        torch.testing.assert_close(fn(means, cfg), fn(sums, cfg), rtol=1e-12, atol=1e-12)


def test_combined_loss_weights():
    values = _values(np.random.default_rng(7), spread=5.0)
    stats, _ = _stats(values, requires_grad=False)
    cfg = ObjectiveConfig(beta=0.1)
    total, parts = losses.combined_loss(stats, cfg, ("sigmoid", "sft"), (1.0, 0.25))
    expected = numpy_loss("sigmoid", values, cfg).mean() + 0.25 * numpy_loss("sft", values, cfg).mean()
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert set(parts) == {"sigmoid", "sft"}


def test_rewards_include_the_kl_for_tdpo():
    values = _values(np.random.default_rng(8), spread=5.0)
    stats, _ = _stats(values, requires_grad=False)
    chosen, rejected = losses.rewards(stats, ObjectiveConfig(beta=0.5))
    np.testing.assert_allclose(chosen.numpy(), 0.5 * (values["w"] - values["rw"] + values["kl_w"]), rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), 0.5 * (values["l"] - values["rl"] + values["kl_l"]), rtol=1e-12)


def _trl_experimental(name: str):
    trl = pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        module = __import__(f"trl.experimental.{name}.{name}_trainer", fromlist=["x"])
    except ImportError as err:
        pytest.skip(f"trl {trl.__version__} has no experimental {name} trainer ({err})")
    return module


def _pairs_with_means(rng):
    """Sequence log-probs (sums) of realistic size and their token counts; the means ``ā`` lie in (-3, -0.01)."""
    values = _values(rng, 5.0)
    values["w"] = -rng.uniform(0.01, 3.0, 6) * values["len_w"]
    values["l"] = -rng.uniform(0.01, 3.0, 6) * values["len_l"]
    return values


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_odds_ratio_loss(beta):
    """TRL 1.16's ``ORPOTrainer``: ``loss = nll - mean(β logσ(log_odds))`` on mean log-probs; the same NLL given to
    both (TRL's trainer takes it over prompt and response from its own cross-entropy; ours is over the chosen
    responses' kept tokens)."""
    import types

    module = _trl_experimental("orpo")
    values = _pairs_with_means(np.random.default_rng(4))
    stats, _ = _stats(values, requires_grad=False)
    cfg = ObjectiveConfig(beta=beta)
    ours = losses.combined_loss(stats, cfg, ("orpo",), (1.0,))[0]
    trainer = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses = module.ORPOTrainer.odds_ratio_loss(trainer, stats.chosen_logps / stats.chosen_lengths,
                                                    stats.rejected_logps / stats.rejected_lengths)[0]
    nll = losses.sft_loss(stats, cfg)[0]
    # TRL computes the odds in fp32 (its .float())
    torch.testing.assert_close(ours, nll - trl_losses.double().mean(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alphapo_alpha", [0.0, 0.05])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0, 0.5])
def test_cpo_matches_trl_cpo_loss(cpo_alpha, label_smoothing, alphapo_alpha):
    """TRL 1.16's ``CPOTrainer`` with ``loss_type="sigmoid"``, with and without AlphaPO's rewards (its ``alpha``):
    ``mean(losses) + cpo_alpha * nll`` on summed log-probs."""
    import types

    module = _trl_experimental("cpo")
    values = _pairs_with_means(np.random.default_rng(5))
    stats, _ = _stats(values, requires_grad=False)
    cfg = ObjectiveConfig(beta=0.1, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha, alphapo_alpha=alphapo_alpha)
    ours = losses.combined_loss(stats, cfg, ("cpo",), (1.0,))[0]
    trainer = types.SimpleNamespace(beta=0.1, alpha=alphapo_alpha, loss_type="sigmoid", label_smoothing=label_smoothing,
                                    simpo_gamma=0.5, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses = module.CPOTrainer.cpo_loss(trainer, stats.chosen_logps, stats.rejected_logps)[0]
    nll = losses.sft_loss(stats, cfg)[0]
    torch.testing.assert_close(ours, trl_losses.mean() + cpo_alpha * nll, rtol=1e-12, atol=1e-12)


def test_cpo_simpo_variant_is_simpo_with_the_nll():
    """TRL's ``CPOTrainer(loss_type="simpo")``: ``simpo`` and ``sft`` combined, reference-free (``γ / β`` in TRL's
    logits is ``γ`` outside ``β``)."""
    import types

    module = _trl_experimental("cpo")
    values = _pairs_with_means(np.random.default_rng(6))
    stats, _ = _stats(values, requires_grad=False)
    stats_mean = PairStatistics(stats.chosen_logps / stats.chosen_lengths,
                                stats.rejected_logps / stats.rejected_lengths, stats.chosen_ref_logps * 0,
                                stats.rejected_ref_logps * 0, stats.chosen_lengths, stats.rejected_lengths,
                                average_log_prob=True)
    cfg = ObjectiveConfig(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.7)
    ours = losses.combined_loss(stats_mean, cfg, ("simpo", "sft"), (1.0, 0.7))[0]
    trainer = types.SimpleNamespace(beta=2.0, alpha=0.0, loss_type="simpo", label_smoothing=0.0, simpo_gamma=0.5,
                                    accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses = module.CPOTrainer.cpo_loss(trainer, stats_mean.chosen_logps, stats_mean.rejected_logps)[0]
    torch.testing.assert_close(ours, trl_losses.mean() + 0.7 * losses.sft_loss(stats, cfg)[0], rtol=1e-12, atol=1e-12)
