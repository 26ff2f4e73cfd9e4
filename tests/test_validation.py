"""Bad input gets a clear error naming the argument, raised before any backend runs."""

from __future__ import annotations

import pytest
import torch

import dpo_kernels.checks as checks
import dpo_kernels.ops.dispatch as dispatch
from dpo_kernels import (
    fused_dpo_loss,
    linear_token_logprobs,
    linear_token_logprobs_and_kl,
    token_logprobs,
    token_logprobs_and_kl,
)

B, T, V, D = 2, 5, 11, 4


@pytest.fixture(autouse=True)
def no_backend_may_run(monkeypatch):
    """Every call in this module must fail validation before a backend is resolved."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a backend was resolved before validation rejected the input")

    monkeypatch.setattr(dispatch, "resolve_backend", forbidden)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        labels=torch.randint(0, V, (2 * B, T), generator=g),
        policy_logits=torch.randn(2 * B, T, V, generator=g),
        ref_logits=torch.randn(2 * B, T, V, generator=g),
    )


def _head_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        labels=torch.randint(0, V, (2 * B, T), generator=g),
        policy_hidden=torch.randn(2 * B, T, D, generator=g),
        lm_head_weight=torch.randn(V, D, generator=g),
        ref_hidden=torch.randn(2 * B, T, D, generator=g),
        ref_lm_head_weight=torch.randn(V, D, generator=g),
    )


def _expect(error, match, **overrides):
    kwargs = {**_inputs(), **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with pytest.raises(error, match=match):
        fused_dpo_loss(**kwargs)


def test_policy_given_twice_or_not_at_all():
    h = _head_inputs()
    _expect(ValueError, "policy exactly once", policy_hidden=h["policy_hidden"], lm_head_weight=h["lm_head_weight"])
    _expect(ValueError, "policy exactly once", policy_logits=None)


def test_policy_hidden_needs_a_head_and_logits_take_none():
    h = _head_inputs()
    _expect(ValueError, "lm_head_weight", policy_logits=None, policy_hidden=h["policy_hidden"])
    _expect(ValueError, "lm_head_weight", lm_head_weight=h["lm_head_weight"])
    _expect(ValueError, "ref_lm_head_weight", ref_logits=None, ref_hidden=h["ref_hidden"])


def test_shapes_that_disagree():
    x = _inputs()
    _expect(ValueError, "policy_logits must have shape", policy_logits=x["policy_logits"][:, :-1])
    _expect(ValueError, "ref_logits must have shape", ref_logits=x["ref_logits"][:, :-1])
    _expect(ValueError, "vocabulary size", ref_logits=torch.randn(2 * B, T, V + 1))
    _expect(ValueError, "labels must be \\[2B, T\\]", labels=x["labels"].reshape(-1))
    h = _head_inputs()
    with pytest.raises(ValueError, match="lm_head_weight must have shape \\[V, 4\\]"):
        fused_dpo_loss(**{**h, "lm_head_weight": torch.randn(V, D + 1)})
    with pytest.raises(ValueError, match="lm_head_bias must have shape \\[11\\]"):
        fused_dpo_loss(**h, lm_head_bias=torch.randn(V + 1))
    with pytest.raises(ValueError, match="ref_hidden must have shape"):
        fused_dpo_loss(**{**h, "ref_hidden": torch.randn(2 * B, T + 1, D)})


def test_odd_number_of_rows():
    x = _inputs()
    _expect(ValueError, "even, non-zero number of rows", labels=x["labels"][:3], policy_logits=x["policy_logits"][:3],
            ref_logits=x["ref_logits"][:3])


def test_labels_out_of_range_and_float_labels():
    x = _inputs()
    bad = x["labels"].clone()
    bad[1, 2] = V
    _expect(ValueError, f"labels must be in \\[0, {V}\\) or equal ignore_index=-100; found {V}", labels=bad)
    bad[1, 2] = -7
    _expect(ValueError, "found -7", labels=bad)
    _expect(TypeError, "labels must be an integer tensor", labels=x["labels"].float())
    with pytest.raises(ValueError, match="labels must be in"):
        token_logprobs(x["policy_logits"], bad)


def test_devices_that_disagree_and_dtypes_that_are_not_float():
    """Float dtypes may differ (mixed precision, tests/test_mixed_precision.py); devices may not."""
    x = _inputs()
    _expect(ValueError, "one device", policy_logits=x["policy_logits"].to("meta"), ref_logits=x["ref_logits"].to("meta"))
    h = _head_inputs()
    with pytest.raises(ValueError, match="one device"):
        fused_dpo_loss(**{**h, "ref_hidden": h["ref_hidden"].to("meta")})
    with pytest.raises(TypeError, match="policy_logits must be float16, bfloat16, float32 or float64"):
        fused_dpo_loss(**{**x, "policy_logits": x["policy_logits"].long()})
    with pytest.raises(TypeError, match="lm_head_weight must be float16, bfloat16, float32 or float64"):
        fused_dpo_loss(**{**h, "lm_head_weight": h["lm_head_weight"].int()})


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_beta_must_be_positive(beta):
    _expect(ValueError, "beta must be a finite number > 0", beta=beta)


@pytest.mark.parametrize(
    "loss_type, eps, match",
    [
        ("robust", 0.5, "label_smoothing must be in \\[0.0, 0.5\\) for loss_type 'robust'"),
        ("sigmoid", 0.6, "label_smoothing must be in \\[0.0, 0.5\\] for loss_type 'sigmoid'"),
        ("sigmoid", -0.1, "label_smoothing must be in"),
        ("exo_pair", 0.0, "label_smoothing must be in \\(0.0, 1.0\\) for loss_type 'exo_pair'"),
        ("hinge", 0.1, "label_smoothing=0.1 is not used by loss_type \\['hinge'\\]"),
    ],
)
def test_label_smoothing_range(loss_type, eps, match):
    _expect(ValueError, match, loss_type=loss_type, label_smoothing=eps)


def test_tdpo_needs_reference_distributions():
    x = _inputs()
    _expect(ValueError, "not precomputed ref_logps", loss_type="tdpo1", ref_logits=None,
            ref_logps=torch.zeros(2 * B))
    h = _head_inputs()
    with pytest.raises(ValueError, match="both as logits"):
        fused_dpo_loss(labels=x["labels"], policy_logits=x["policy_logits"], ref_hidden=h["ref_hidden"],
                       ref_lm_head_weight=h["ref_lm_head_weight"], loss_type="tdpo2")
    _expect(ValueError, "reference_free=True cannot be used with a TDPO", loss_type="tdpo2", reference_free=True)


def test_unknown_loss_type_and_bad_weights():
    _expect(ValueError, "loss_type must be one of", loss_type="dpo")
    _expect(ValueError, "loss_type must be one of", loss_type=["sigmoid", "nope"])
    _expect(ValueError, "at least one", loss_type=[])
    _expect(ValueError, "loss_weights must be 2 finite", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    _expect(ValueError, "f_divergence_type must be one of", f_divergence_type="kl")
    _expect(ValueError, "must use f_divergence_type='reverse_kl'", loss_type="bco_pair", f_divergence_type="forward_kl")


def test_reference_missing_or_unused():
    _expect(ValueError, "needs a reference", ref_logits=None)
    _expect(ValueError, "uses no reference, but ref_logits was given", loss_type="simpo")
    _expect(ValueError, "reference_free=True uses no reference", reference_free=True)
    _expect(ValueError, "give the reference at most once", ref_logps=torch.zeros(2 * B))
    _expect(ValueError, "ref_logps must be \\[2B\\]", ref_logits=None, ref_logps=torch.zeros(2 * B + 1))


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("softcap", -1.0, "softcap must be None or a finite number > 0"),
        ("logit_scale", 0.0, "logit_scale must be a finite non-zero number"),
        ("token_chunk_size", 0, "token_chunk_size must be None or a positive int"),
        ("discopop_tau", 0.0, "discopop_tau must be a finite number > 0"),
        ("ignore_index", 1.5, "ignore_index must be an int"),
    ],
)
def test_bad_options(option, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_dpo_loss(**_inputs(), **{option: value})


def test_unknown_backend_is_rejected_by_the_dispatcher(monkeypatch):
    monkeypatch.undo()  # let the real dispatcher answer
    x = _inputs()
    with pytest.raises(ValueError, match="backend must be one of auto, reference, torch"):
        token_logprobs(x["policy_logits"], x["labels"], backend="cuda-magic")


def test_primitive_shape_checks():
    x, h = _inputs(), _head_inputs()
    with pytest.raises(ValueError, match="logits must have shape \\[..., T, V\\] matching labels"):
        token_logprobs(x["policy_logits"], x["labels"][:, :-1])
    with pytest.raises(ValueError, match="ref_logits must have the vocabulary size"):
        token_logprobs_and_kl(x["policy_logits"], torch.randn(2 * B, T, V + 2), x["labels"])
    with pytest.raises(ValueError, match="weight must be a 2-D head weight"):
        linear_token_logprobs(h["policy_hidden"], h["lm_head_weight"][0], h["labels"])
    with pytest.raises(ValueError, match="ref_weight must have the vocabulary size"):
        linear_token_logprobs_and_kl(h["policy_hidden"], h["lm_head_weight"], h["ref_hidden"],
                                     torch.randn(V + 1, D), h["labels"])
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        linear_token_logprobs(h["policy_hidden"].tolist(), h["lm_head_weight"], h["labels"])


def test_unshifted_labels_warn_once(monkeypatch):
    """labels whose first position is scored look like input_ids passed without shift=True: one warning per
    process, none with shift=True (the first label is dropped) or with check_labels=False."""
    import warnings

    import dpo_kernels.dpo as dpo_module

    monkeypatch.setattr(dispatch, "resolve_backend", _resolve)  # this test runs the loss
    x = _inputs()
    assert (x["labels"][:, 0] != -100).all()
    monkeypatch.setattr(dpo_module, "_warned_unshifted", False)
    with pytest.warns(UserWarning, match="as if labels were input_ids"):
        fused_dpo_loss(**x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_dpo_loss(**x)  # once
        monkeypatch.setattr(dpo_module, "_warned_unshifted", False)
        fused_dpo_loss(**x, shift=True)
        fused_dpo_loss(**x, check_labels=False)
        masked = x["labels"].clone()
        masked[:, 0] = -100
        fused_dpo_loss(**{**x, "labels": masked})


def test_check_labels_false_skips_the_host_sync(monkeypatch):
    monkeypatch.setattr(dispatch, "resolve_backend", _resolve)
    calls = []
    monkeypatch.setattr(checks, "require_labels_in_vocab", lambda *a, **k: calls.append(a))
    x = _inputs()
    fused_dpo_loss(**x, shift=True, check_labels=False)
    token_logprobs(x["policy_logits"], x["labels"], check_labels=False)
    assert calls == []
    token_logprobs(x["policy_logits"], x["labels"])
    assert len(calls) == 1
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        token_logprobs(x["policy_logits"], x["labels"], check_labels=1)


from dpo_kernels.ops.registry import resolve_backend as _resolve  # noqa: E402


def test_a_keyword_a_primitive_does_not_take_is_refused_by_name():
    """Issue 28: the primitives' option keywords come from TokenOptions (declared once); each takes the ones that
    apply to it, and any other keyword is refused as Python refuses one."""
    import inspect

    x = _inputs()
    with pytest.raises(TypeError, match="token_logprobs\\(\\) got an unexpected keyword argument 'vocab_chunk_size'"):
        token_logprobs(x["policy_logits"], x["labels"], vocab_chunk_size=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'"):
        fused_dpo_loss(**x, betta=0.1)
    assert "vocab_chunk_size" in inspect.signature(linear_token_logprobs).parameters
    assert "inplace_backward" not in inspect.signature(linear_token_logprobs).parameters
