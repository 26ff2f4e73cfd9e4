"""``fused_dpo_loss`` end to end: against a from-scratch full-logits computation (torch.log_softmax and the NumPy
closed forms of ``test_losses``), across input forms (logits, hidden states, precomputed reference log-probs),
shift, averaging, reference-free, TDPO, metrics, and the ``nn.Module`` wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_kernels import FusedDPOLoss, fused_dpo_loss, linear_token_logprobs, losses, token_logprobs
from dpo_kernels.losses import ObjectiveConfig
from dpo_kernels.ops import backends_for

from .test_losses import numpy_loss

B, T, V, D = 3, 7, 101, 12


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100
    hidden = torch.randn(2 * B, T, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, D, generator=g, dtype=dtype)
    ref_weight = weight + 0.1 * torch.randn(V, D, generator=g, dtype=dtype)
    return dict(labels=labels, hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight)


def _manual_sequence_stats(d, shift=False):
    """Sums of per-token log-probs and KLs and token counts, from full logits with torch.log_softmax."""
    logits = d["hidden"] @ d["weight"].T + d["bias"]
    ref_logits = d["ref_hidden"] @ d["ref_weight"].T
    labels = d["labels"]
    if shift:
        logits, ref_logits, labels = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    idx = labels.clamp(min=0).unsqueeze(-1)
    lp, rlp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    tok = lp.gather(-1, idx).squeeze(-1) * mask
    ref_tok = rlp.gather(-1, idx).squeeze(-1) * mask
    kl = (rlp.exp() * (rlp - lp)).sum(-1) * mask
    return {
        "logps": tok.sum(1).numpy(),
        "ref_logps": ref_tok.sum(1).numpy(),
        "kl": kl.sum(1).numpy(),
        "len": mask.sum(1).double().numpy(),
        "ref_tok": ref_tok,
    }


def _as_numpy_pairs(m):
    return {
        "w": m["logps"][:B], "l": m["logps"][B:], "rw": m["ref_logps"][:B], "rl": m["ref_logps"][B:],
        "len_w": m["len"][:B], "len_l": m["len"][B:], "kl_w": m["kl"][:B], "kl_l": m["kl"][B:],
    }


def _call(d, form: str, **kw):
    policy = (
        dict(policy_logits=d["hidden"] @ d["weight"].T + d["bias"])
        if form.startswith("logits")
        else dict(policy_hidden=d["hidden"], lm_head_weight=d["weight"], lm_head_bias=d["bias"])
    )
    reference = (
        dict(ref_logits=d["ref_hidden"] @ d["ref_weight"].T)
        if form.startswith("logits")
        else dict(ref_hidden=d["ref_hidden"], ref_lm_head_weight=d["ref_weight"])
    )
    if kw.pop("reference", True) is False:
        reference = {}
    return fused_dpo_loss(labels=d["labels"], **policy, **reference, **kw)


SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1}


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("loss_type", sorted(losses.OBJECTIVES))
def test_every_loss_type_matches_full_logits_computation(loss_type, form):
    d = _data()
    eps = SMOOTHING.get(loss_type, 0.0)
    needs_ref = losses.OBJECTIVES[loss_type].uses_reference or losses.OBJECTIVES[loss_type].uses_token_kl
    out = _call(d, form, loss_type=loss_type, beta=0.05, label_smoothing=eps, reference=needs_ref, backend="torch")
    m = _as_numpy_pairs(_manual_sequence_stats(d))
    if not needs_ref:
        m["rw"], m["rl"] = np.zeros(B), np.zeros(B)
    expected = numpy_loss(loss_type, m, ObjectiveConfig(beta=0.05, label_smoothing=eps)).mean()
    assert out.loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(out.chosen_logps.detach().numpy(), m["w"], rtol=1e-10)
    np.testing.assert_allclose(out.rejected_logps.detach().numpy(), m["l"], rtol=1e-10)
    if losses.OBJECTIVES[loss_type].uses_token_kl:
        np.testing.assert_allclose(out.chosen_kl.numpy(), m["kl_w"], rtol=1e-9)
        np.testing.assert_allclose(out.rejected_kl.numpy(), m["kl_l"], rtol=1e-9)
        assert out.metrics["kl/chosen"] == pytest.approx(m["kl_w"].mean(), rel=1e-9)
    else:
        assert out.chosen_kl is None and "kl/chosen" not in out.metrics


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "tdpo1", "tdpo2", "sft"])
def test_gradients_equal_reference_backend(loss_type, form):
    """The fused backward (hand-written) equals autograd through the naive path, to all inputs."""
    d = _data(torch.float32)
    grads = {}
    needs_ref = loss_type not in ("simpo", "sft")
    for backend in ("reference", "torch"):
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in d.items()}
        if form == "logits":
            logits = (leaves["hidden"] @ leaves["weight"].T + leaves["bias"]).detach().requires_grad_()
            ref_logits = leaves["ref_hidden"] @ leaves["ref_weight"].T
            out = fused_dpo_loss(
                labels=d["labels"], policy_logits=logits, loss_type=loss_type, beta=0.1, backend=backend,
                **(dict(ref_logits=ref_logits) if needs_ref else {}),
            )
            out.loss.backward()
            grads[backend] = [logits.grad]
        else:
            out = fused_dpo_loss(
                labels=d["labels"], policy_hidden=leaves["hidden"], lm_head_weight=leaves["weight"],
                lm_head_bias=leaves["bias"], loss_type=loss_type, beta=0.1, backend=backend,
                **(dict(ref_hidden=leaves["ref_hidden"], ref_lm_head_weight=leaves["ref_weight"]) if needs_ref else {}),
            )
            out.loss.backward()
            grads[backend] = [leaves[k].grad for k in ("hidden", "weight", "bias")]
            assert leaves["ref_hidden"].grad is None and leaves["ref_weight"].grad is None
    for got, expected in zip(grads["torch"], grads["reference"], strict=True):
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-5 * scale


def test_tdpo2_chosen_kl_gets_no_gradient_through_the_fused_path():
    """Gradient of TDPO2 equals the manual computation with K_w detached, and differs from TDPO1's."""
    d = _data()
    logits = (d["hidden"] @ d["weight"].T).requires_grad_()
    ref_logits = d["ref_hidden"] @ d["ref_weight"].T
    out = fused_dpo_loss(labels=d["labels"], policy_logits=logits, ref_logits=ref_logits, loss_type="tdpo2",
                         beta=0.2, alpha=0.6, backend="torch")
    out.loss.backward()

    manual_logits = logits.detach().clone().requires_grad_()
    mask = d["labels"] != -100
    idx = d["labels"].clamp(min=0).unsqueeze(-1)
    lp, rlp = manual_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    logps = (lp.gather(-1, idx).squeeze(-1) * mask).sum(1)
    ref_logps = (rlp.gather(-1, idx).squeeze(-1) * mask).sum(1)
    kl = ((rlp.exp() * (rlp - lp)).sum(-1) * mask).sum(1)
    r = logps - ref_logps
    z = 0.2 * ((r[:B] - r[B:]) - 0.6 * (kl[B:] - kl[:B].detach()))
    (-torch.nn.functional.logsigmoid(z).mean()).backward()
    torch.testing.assert_close(logits.grad, manual_logits.grad, rtol=1e-10, atol=1e-12)


def test_precomputed_reference_logps_forms_agree():
    d = _data()
    m = _manual_sequence_stats(d)
    from_head = _call(d, "hidden", loss_type="sigmoid", backend="torch")
    sequence = fused_dpo_loss(labels=d["labels"], policy_hidden=d["hidden"], lm_head_weight=d["weight"],
                              lm_head_bias=d["bias"], ref_logps=torch.from_numpy(m["ref_logps"]))
    per_token = fused_dpo_loss(labels=d["labels"], policy_hidden=d["hidden"], lm_head_weight=d["weight"],
                               lm_head_bias=d["bias"], ref_logps=m["ref_tok"])
    for out in (sequence, per_token):
        assert out.loss.item() == pytest.approx(from_head.loss.item(), rel=1e-12)
        assert out.metrics == pytest.approx(from_head.metrics, rel=1e-12)


def test_shift_equals_manually_shifted_inputs():
    d = _data()
    shifted = _call(d, "hidden", loss_type="tdpo2", shift=True)
    m = _as_numpy_pairs(_manual_sequence_stats(d, shift=True))
    assert shifted.loss.item() == pytest.approx(numpy_loss("tdpo2", m, ObjectiveConfig()).mean(), rel=1e-10)
    logits_path = _call(d, "logits", loss_type="tdpo2", shift=True)
    assert logits_path.loss.item() == pytest.approx(shifted.loss.item(), rel=1e-10)


def test_average_log_prob_divides_by_token_count():
    d = _data()
    out = _call(d, "hidden", loss_type="sigmoid", average_log_prob=True, beta=0.5)
    m = _manual_sequence_stats(d)
    means = {k: m[k] / m["len"] for k in ("logps", "ref_logps")}
    pairs = _as_numpy_pairs({**m, **means})
    assert out.loss.item() == pytest.approx(numpy_loss("sigmoid", pairs, ObjectiveConfig(beta=0.5)).mean(), rel=1e-10)
    np.testing.assert_allclose(out.chosen_logps.detach().numpy(), means["logps"][:B], rtol=1e-10)


def test_reference_free_uses_zero_reference():
    d = _data()
    out = _call(d, "hidden", loss_type="sigmoid", reference_free=True, reference=False, beta=0.01)
    m = _as_numpy_pairs(_manual_sequence_stats(d))
    m["rw"], m["rl"] = np.zeros(B), np.zeros(B)
    assert out.loss.item() == pytest.approx(numpy_loss("sigmoid", m, ObjectiveConfig(beta=0.01)).mean(), rel=1e-10)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), 0.01 * m["w"], rtol=1e-10)


def test_metrics_have_trl_names_and_values():
    d = _data()
    out = _call(d, "hidden", loss_type="sigmoid", beta=0.1)
    m = _as_numpy_pairs(_manual_sequence_stats(d))
    cw, cl = 0.1 * (m["w"] - m["rw"]), 0.1 * (m["l"] - m["rl"])
    expected = {
        "rewards/chosen": cw.mean(),
        "rewards/rejected": cl.mean(),
        "rewards/accuracies": (cw > cl).mean(),
        "rewards/margins": (cw - cl).mean(),
        "logps/chosen": m["w"].mean(),
        "logps/rejected": m["l"].mean(),
        "logps/accuracies": (m["w"] > m["l"]).mean(),
    }
    assert out.metrics == pytest.approx(expected, rel=1e-10)
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert not out.chosen_rewards.requires_grad and out.chosen_logps.requires_grad is False  # float64 leaves
    assert out.chosen_rewards.shape == (B,)


def test_loss_type_list_with_weights():
    d = _data()
    combined = _call(d, "hidden", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    parts = [_call(d, "hidden", loss_type=t).loss.item() for t in ("sigmoid",)]
    sft = _call(d, "hidden", loss_type="sft", reference=False).loss.item()
    assert combined.loss.item() == pytest.approx(parts[0] + 0.5 * sft, rel=1e-12)


def test_fully_masked_pair_gives_no_nan():
    d = _data(torch.float32)
    d["labels"][0] = -100
    d["labels"][B] = -100
    for loss_type in sorted(losses.OBJECTIVES):
        needs_ref = losses.OBJECTIVES[loss_type].uses_reference or losses.OBJECTIVES[loss_type].uses_token_kl
        h = d["hidden"].clone().requires_grad_()
        out = fused_dpo_loss(
            labels=d["labels"], policy_hidden=h, lm_head_weight=d["weight"], loss_type=loss_type,
            label_smoothing=SMOOTHING.get(loss_type, 0.0),
            **(dict(ref_hidden=d["ref_hidden"], ref_lm_head_weight=d["ref_weight"]) if needs_ref else {}),
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all(), loss_type
        assert out.chosen_logps[0].item() == 0.0
        assert (h.grad[0] == 0).all() and (h.grad[B] == 0).all(), loss_type


def test_module_wrapper_equals_function():
    d = _data()
    criterion = FusedDPOLoss(loss_type="tdpo2", beta=0.2, alpha=0.4, shift=True)
    assert "tdpo2" in repr(criterion)
    out = criterion(labels=d["labels"], policy_hidden=d["hidden"], lm_head_weight=d["weight"],
                    lm_head_bias=d["bias"], ref_hidden=d["ref_hidden"], ref_lm_head_weight=d["ref_weight"])
    expected = _call(d, "hidden", loss_type="tdpo2", beta=0.2, alpha=0.4, shift=True)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        FusedDPOLoss(beta=0)


def test_public_defaults_agree_with_the_option_dataclasses():
    """One place per default: every keyword default of the public functions equals its dataclass field."""
    import dataclasses
    import inspect

    import dpo_kernels
    from dpo_kernels import DPOLossConfig, TokenOptions

    from dpo_kernels.dpo import PreferenceInputs

    config_defaults = {f.name: f.default for f in dataclasses.fields(DPOLossConfig) if f.init}
    token_defaults = {f.name: f.default for f in dataclasses.fields(TokenOptions)}
    params = inspect.signature(fused_dpo_loss).parameters
    tensors = {f.name for f in dataclasses.fields(PreferenceInputs)}
    assert set(params) == set(config_defaults) | tensors, "fused_dpo_loss takes exactly the options and the tensors"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    for name, default in config_defaults.items():
        assert params[name].default == default, name
    for fn in (dpo_kernels.token_logprobs, dpo_kernels.token_logprobs_and_kl, dpo_kernels.linear_token_logprobs,
               dpo_kernels.linear_token_logprobs_and_kl):
        for name, param in inspect.signature(fn).parameters.items():
            if name in token_defaults:
                assert param.default == token_defaults[name], f"{fn.__name__}.{name}"
            elif name == "backend":
                assert param.default == DPOLossConfig.backend


def test_combined_losses_are_logged_each():
    d = _data()
    out = _call(d, "hidden", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    single = _call(d, "hidden", loss_type="sigmoid")
    assert out.metrics["loss/sigmoid"] == pytest.approx(single.loss.item(), rel=1e-12)
    assert "loss/sigmoid" not in single.metrics


def _full_logits(d):
    return d["hidden"] @ d["weight"].T + d["bias"], d["ref_hidden"] @ d["ref_weight"].T


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_wpo_weighting_and_ld_alpha_against_full_logits(form):
    """``use_weighting`` (WPO) and ``ld_alpha`` (LD-DPO) as TRL computes them, from full log-softmaxes by hand."""
    d = _data()
    logits, ref_logits = _full_logits(d)
    labels, mask = d["labels"], d["labels"] != -100
    idx = labels.clamp(min=0).unsqueeze(-1)
    lp, rlp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    tok, ref_tok = lp.gather(-1, idx).squeeze(-1) * mask, rlp.gather(-1, idx).squeeze(-1) * mask
    position, lengths = mask.cumsum(1), mask.sum(1)
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2).unsqueeze(1)
    c = torch.where(position <= shared, 1.0, 0.3).double()
    delta = ((tok * c).sum(1) - (ref_tok * c).sum(1))
    sq = torch.logsumexp(2 * lp, dim=-1)
    wpo = torch.exp(((tok - sq) * mask).sum(1) / lengths)
    expected = (-torch.nn.functional.logsigmoid(0.1 * (delta[:B] - delta[B:])) * wpo[:B] * wpo[B:]).mean()
    if form == "logits":
        policy = dict(policy_logits=logits, ref_logits=ref_logits)
    else:
        policy = dict(policy_hidden=d["hidden"], lm_head_weight=d["weight"], lm_head_bias=d["bias"],
                      ref_hidden=d["ref_hidden"], ref_lm_head_weight=d["ref_weight"])
    got = fused_dpo_loss(labels=labels, **policy, use_weighting=True, ld_alpha=0.3, backend="torch")
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-8)


def test_tdpo2_alpha_must_not_reward_the_kl():
    d = _data()
    with pytest.raises(ValueError, match="alpha .* must be >= 0"):
        _call(d, "hidden", loss_type="tdpo2", alpha=-0.5)
    with pytest.warns(UserWarning, match="alpha=1.5 > 1"):
        _call(d, "hidden", loss_type="tdpo2", alpha=1.5)
    with pytest.raises(ValueError, match="ld_alpha"):
        _call(d, "hidden", ld_alpha=1.5)


@pytest.mark.parametrize("backend", ["reference", *backends_for("cpu")])
def test_labels_without_positions_give_empty_statistics_and_the_empty_rows_loss(backend):
    """Issue 27: ``labels [R, 0]`` raised a raw reshape error from the host read. Rows with no scored token have
    log-prob 0 (MATH.md §2): the primitives return ``[R, 0]``, sigmoid DPO gives ln 2 and zero gradients."""
    import math

    labels = torch.zeros(4, 0, dtype=torch.long)
    h, w = torch.randn(4, 0, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    z = torch.randn(4, 0, 50, requires_grad=True)
    assert token_logprobs(z, labels, backend=backend).shape == (4, 0)
    assert linear_token_logprobs(h, w, labels, backend=backend).shape == (4, 0)
    for schedule in ("eager", "recompute") if backend != "reference" else ("recompute",):
        out = fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w, ref_hidden=h.detach(),
                             ref_lm_head_weight=w.detach(), loss_type="tdpo2", backend=backend, schedule=schedule)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
        assert w.grad is None or (w.grad == 0).all()
    out = fused_dpo_loss(labels=labels, policy_logits=z, ref_logits=z.detach(), backend=backend)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
