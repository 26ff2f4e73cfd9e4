"""``FusedDPOTrainer`` trains the objective the user configured: every ``DPOConfig`` field is honoured with TRL's
meaning (three training steps equal stock ``DPOTrainer``'s) or refused by name at construction; the reference runs
under the same autocast as the policy (a policy identical to its reference gives exactly ln 2 and zero margins);
reference-free objectives need no reference model."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional dependency")

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402
from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm  # noqa: E402

from .test_trl_options import _COMMON, _assert_same_training, _train  # noqa: E402
from .test_trl_patch import _dataset, _model, _tokenizer  # noqa: E402


def _first_step_log(model, ref_model, **config):
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[],
                          save_strategy="no", max_steps=1, logging_steps=1, learning_rate=1e-3, disable_tqdm=True,
                          **config)
    trainer = FusedDPOTrainer(model=model, ref_model=ref_model, args=args,
                              train_dataset=synthetic_preferences(8, completion_len=(40, 60)),
                              processing_class=_tokenizer())
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_identical_policy_and_reference_give_exactly_ln2(precision, peft):
    """DPOConfig's default bf16 autocast: before, the reference backbone ran without it (accelerate wraps the
    reference's original forward, which the hidden-states forward bypassed) and step 1 gave a biased log-ratio
    (loss ln 2 + 1e-4, reward accuracy 0.25 at this size). The check is exact, not to bf16 accuracy."""
    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 mixed precision (GradScaler) needs a CUDA device")
    device = dict(use_cpu=not torch.cuda.is_available())
    model = tiny_causal_lm("llama", hidden=64, layers=2)
    if peft:
        peft_lib = pytest.importorskip("peft")
        model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        ref_model = None  # LoRA starts as the identity: the policy with its adapter disabled is the same model
    else:
        ref_model = copy.deepcopy(model)
    logged = _first_step_log(model, ref_model, **{precision: True}, **device)
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert logged["rewards/margins"] == 0.0
    assert logged["rewards/accuracies"] == 0.0


def test_every_dpo_config_field_is_classified():
    """A field a new TRL adds to DPOConfig fails here until FusedDPOTrainer says how it treats it."""
    fields = dk_trl._dpo_config_fields(trl.DPOConfig)
    unclassified = sorted(set(fields) - set(dk_trl.DPO_CONFIG_FIELDS))
    assert not unclassified, f"classify these DPOConfig fields in DPO_CONFIG_FIELDS: {unclassified}"
    assert set(dk_trl.DPO_CONFIG_FIELDS.values()) <= {"loss", "trl", "checked"}


# every option that shapes the objective, and the reference-model sync, against stock TRL over three steps
STOCK_OPTIONS = {
    "js_divergence": dict(f_divergence_type="js_divergence"),
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "use_weighting": dict(use_weighting=True),
    "ld_alpha": dict(ld_alpha=0.4),
    "discopop_tau": dict(loss_type=["discopop"], discopop_tau=0.3),
    "robust_smoothing": dict(loss_type=["robust"], label_smoothing=0.2),
    "exo_pair_smoothing": dict(loss_type=["exo_pair"], label_smoothing=0.1),
    "aot_smoothing": dict(loss_type=["aot"], label_smoothing=0.1),
    "hinge_ignores_smoothing": dict(loss_type=["hinge"], label_smoothing=0.1),
    "weighted_combination": dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3], use_weighting=True,
                                 ld_alpha=0.5),
    "sync_ref_model": dict(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1),
}


@pytest.mark.parametrize("option", STOCK_OPTIONS.values(), ids=STOCK_OPTIONS.keys())
def test_dpo_config_options_train_as_stock(option):
    """Before, f_divergence_type, use_weighting, ld_alpha and discopop_tau were dropped (js_divergence trained the
    plain sigmoid run)."""
    dk_trl.unpatch()
    stock = _train(trl.DPOTrainer, trl.DPOConfig, **option)
    fused = _train(FusedDPOTrainer, FusedDPOConfig, kernel_backend="torch", **option)
    _assert_same_training(fused, stock)


def _construct(model, ref_model, **config):
    args = FusedDPOConfig(**{**_COMMON, "max_steps": 1}, kernel_backend="torch", **config)
    return FusedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(8),
                           processing_class=_tokenizer())


def test_sigmoid_label_smoothing_is_refused_at_construction():
    """TRL 1.14-1.16 ignore label_smoothing for 'sigmoid'; dpo_kernels applies it, so the two trainers would differ."""
    model = _model("llama")
    with pytest.raises(ValueError, match="label_smoothing=0.1 with loss_type 'sigmoid'"):
        _construct(model, copy.deepcopy(model), label_smoothing=0.1)


def _tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=202, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, pad_token_id=200, eos_token_id=201,
                                     router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg)


def test_moe_router_loss_is_added_as_dpo_trainer_adds_it():
    """Issue 30 (was refused): a Mixture-of-Experts policy's load-balancing loss, weighted by router_aux_loss_coef,
    is added to the fused loss from the same backbone pass: one fp32 step equals stock DPOTrainer's loss, gradients
    (the router's included) and logged aux_loss."""
    from trl import DPOConfig, DPOTrainer

    def step(trainer):
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, trainer._metrics["train"]["aux_loss"][-1]

    model = _tiny_mixtral()
    stock = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model),
                       args=DPOConfig(**{**_COMMON, "max_steps": 1}), train_dataset=_dataset(8),
                       processing_class=_tokenizer())
    fused = _construct(copy.deepcopy(model), copy.deepcopy(model))
    assert fused.aux_loss_enabled and fused.router_aux_loss_coef == 0.01
    (loss, grads, aux), (f_loss, f_grads, f_aux) = step(stock), step(fused)
    assert aux > 0
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-7)
    assert f_aux == pytest.approx(aux, rel=1e-6)
    assert grads.keys() == f_grads.keys() and any("gate" in n for n in grads)
    for name, g in grads.items():
        err = (f_grads[name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err <= 1e-5, f"gradient of {name} differs by {err:.2e}"


def test_unknown_dpo_config_field_is_refused(monkeypatch):
    """A field a later TRL adds, set away from its default, is refused by name rather than ignored."""
    monkeypatch.setattr(dk_trl, "DPO_CONFIG_FIELDS", {k: v for k, v in dk_trl.DPO_CONFIG_FIELDS.items()
                                                     if k != "ld_alpha"})
    model = _model("llama")
    with pytest.raises(ValueError, match=r"\['ld_alpha'\]"):
        _construct(model, copy.deepcopy(model), ld_alpha=0.5)


def test_sync_ref_model_without_a_reference_is_refused():
    with pytest.raises(ValueError, match="sync_ref_model"):
        _construct(_model("llama"), None, loss_type=["simpo"], sync_ref_model=True)


def _losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("loss_type", [["simpo"], ["sft"], ["orpo"], ["cpo"]])
def test_reference_free_losses_need_no_reference_model(loss_type):
    """Before, they failed at the first step ("uses no reference, but ref_hidden was given") and, with
    ref_model=None, DPOTrainer tried to load the policy again from the hub. Now the reference is never read: the
    run with a reference model equals the run without, and no reference model is built."""
    options = dict(loss_type=loss_type, max_steps=2, logging_steps=1)
    torch.manual_seed(0)
    without = FusedDPOTrainer(model=_model("llama"), ref_model=None,
                              args=FusedDPOConfig(**{**_COMMON, **options}, kernel_backend="torch"),
                              train_dataset=_dataset(8), processing_class=_tokenizer())
    assert without.ref_model is None
    torch.manual_seed(0)
    policy = _model("llama")
    with_ref = FusedDPOTrainer(model=policy, ref_model=copy.deepcopy(policy),
                               args=FusedDPOConfig(**{**_COMMON, **options}, kernel_backend="torch"),
                               train_dataset=_dataset(8), processing_class=_tokenizer())
    got, expected = _losses(without), _losses(with_ref)
    assert len(got) == 2 and all(math.isfinite(x) for x in got)
    assert got == pytest.approx(expected, rel=1e-6)


def test_sft_matches_stock():
    """The same loss and updates as stock; the logged rewards differ by design: FusedDPOTrainer reads no reference
    for a reference-free objective (rewards are beta * logp), stock TRL still runs its reference model."""
    dk_trl.unpatch()
    (got_logs, got_weights) = _train(FusedDPOTrainer, FusedDPOConfig, kernel_backend="torch", loss_type=["sft"])
    (logs, weights) = _train(trl.DPOTrainer, trl.DPOConfig, loss_type=["sft"])
    for g, e in zip(got_logs, logs, strict=True):
        for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert g[name] == pytest.approx(e[name], rel=1e-4, abs=1e-6), name
    for name, w in weights.items():
        torch.testing.assert_close(got_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_config_follows_the_trainer_config():
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, bf16=False,
                          loss_type=["tdpo2"], beta=0.3,
                          alpha=0.7, ld_alpha=0.5, use_weighting=True, kernel_backend="torch")
    config = dk_trl.loss_config(args)
    assert (config.loss_types, config.beta, config.alpha, config.ld_alpha, config.use_weighting, config.shift) == (
        ("tdpo2",), 0.3, 0.7, 0.5, True, True)
    assert dataclasses.is_dataclass(config)
    assert (config.schedule, config.eager_budget_mb) == ("auto", None)


@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_both_schedules_train_alike(loss_type, caplog):
    """``kernel_schedule``: the eager schedule (gradients in the forward, here over two groups of pairs) and the
    recompute schedule train the same model, three steps."""
    budget = {"sigmoid": 0.025, "tdpo2": 0.05}[loss_type]  # MiB: two groups of two pairs at this model's vocabulary
    with caplog.at_level("DEBUG", logger="dpo_kernels"):
        eager = _train(FusedDPOTrainer, FusedDPOConfig, kernel_backend="torch", loss_type=[loss_type],
                       kernel_schedule="eager", kernel_eager_budget_mb=budget)
    assert "eager schedule, 2 group(s)" in caplog.text
    recompute = _train(FusedDPOTrainer, FusedDPOConfig, kernel_backend="torch", loss_type=[loss_type],
                       kernel_schedule="recompute")
    _assert_same_training(eager, recompute)


@pytest.mark.parametrize(("fields", "message"), [
    ({"kernel_schedule": "bogus"}, "kernel_schedule must be one of"),
    ({"kernel_eager_budget_mb": -1}, "kernel_eager_budget_mb must be None"),
    ({"kernel_tile_budget_mb": 0}, "kernel_tile_budget_mb must be None"),
    ({"tdpo_alpha": -0.5}, "tdpo_alpha (TDPO2's weight"),
    ({"kernel_backend": "bogus"}, "kernel_backend: "),
    ({"kernel_schedule": "eager", "kernel_backend": "reference"}, "kernel_backend='reference' (the oracle)"),
], ids=["schedule", "eager-budget", "tile-budget", "tdpo-alpha", "backend", "eager-on-the-oracle"])
def test_kernel_fields_are_checked_under_their_own_names_when_the_config_is_made(fields, message):
    """Issue 27: these named fused_dpo_loss's arguments (schedule, eager_budget_mb, alpha), and a forced eager
    schedule on the oracle was accepted and failed at the first training step."""
    with pytest.raises(ValueError) as err:
        FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, **fields)
    assert message in str(err.value)


def test_alpha_is_named_as_in_fused_dpo_loss_and_the_old_name_still_works():
    """Issue 28: one name per option: ``alpha`` as ``fused_dpo_loss`` names it; ``tdpo_alpha`` moves to it with a
    FutureWarning. The kernel fields reach the loss under fused_dpo_loss's names, with its defaults."""
    common = dict(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, loss_type=["tdpo2"])
    assert dk_trl.loss_config(FusedDPOConfig(**common, alpha=0.3)).alpha == 0.3
    with pytest.warns(FutureWarning, match="tdpo_alpha is now alpha"):
        old = FusedDPOConfig(**common, tdpo_alpha=0.7)
    assert old.alpha == 0.7 and old.tdpo_alpha is None and dk_trl.loss_config(old).alpha == 0.7
    config = dk_trl.loss_config(FusedDPOConfig(**common, kernel_backend="torch", kernel_schedule="recompute",
                                               kernel_tile_budget_mb=3.0, kernel_eager_budget_mb=5.0))
    assert (config.backend, config.schedule, config.tile_budget_mb, config.eager_budget_mb) == ("torch", "recompute",
                                                                                                 3.0, 5.0)
    default = dk_trl.loss_config(FusedDPOConfig(**common))
    assert (default.backend, default.schedule, default.tile_budget_mb, default.eager_budget_mb) == ("auto", "auto",
                                                                                                  None, None)


def test_a_forced_eager_budget_too_small_for_one_pair_is_refused_at_construction():
    """Issue 27: it was accepted and failed at the first training step."""
    model = tiny_causal_lm("llama", hidden=64, layers=2)
    data = synthetic_preferences(8, completion_len=(10, 20))
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, kernel_backend="torch",
                          kernel_schedule="eager", kernel_eager_budget_mb=0.01)
    with pytest.raises(ValueError) as err:
        FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                        processing_class=_tokenizer())
    message = str(err.value)
    assert "the longest pair of the training set" in message and "kernel_eager_budget_mb=10.2 KiB" in message, message
    ok = dataclasses.replace(args, kernel_eager_budget_mb=64)
    FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=ok, train_dataset=data,
                    processing_class=_tokenizer())


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_trains_as_trls_cpo_trainer(cpo_alpha):
    """Issue 30: FusedDPOTrainer with loss_type 'cpo' (no reference model) trains three steps as TRL 1.16's
    experimental CPOTrainer (sigmoid, its NLL weighted by cpo_alpha) does: the same logged losses. (TRL's ORPOTrainer
    takes its NLL over prompt and response, where loss_type 'orpo' takes it over the completions the log-probs score,
    so the two differ by that term.)"""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cpo = pytest.importorskip("trl.experimental.cpo", reason="this TRL has no experimental CPO trainer")
    options = dict(max_steps=3, logging_steps=1, learning_rate=1e-2, beta=0.1, cpo_alpha=cpo_alpha)
    model = _model("llama")
    stock = cpo.CPOTrainer(model=copy.deepcopy(model), args=cpo.CPOConfig(**{**_COMMON, **options}),
                           train_dataset=_dataset(12), processing_class=_tokenizer())
    fused = FusedDPOTrainer(model=copy.deepcopy(model), ref_model=None,
                            args=FusedDPOConfig(**{**_COMMON, **options}, loss_type=["cpo"], kernel_backend="torch"),
                            train_dataset=_dataset(12), processing_class=_tokenizer())
    expected, got = _losses(stock), _losses(fused)
    assert len(expected) == 3 and fused.ref_model is None
    assert got == pytest.approx(expected, rel=1e-5)


def test_orpo_trains_as_trls_orpo_trainer_with_its_nll_over_the_prompt():
    """Issue 30: TRL's experimental ORPOTrainer takes its NLL over prompt and completion; with
    orpo_nll_over_prompt=True FusedDPOTrainer does too, and trains three steps as it does. Without it the NLL is over
    the completions (the tokens the log-probs score), and the losses differ."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    orpo = pytest.importorskip("trl.experimental.orpo", reason="this TRL has no experimental ORPO trainer")
    options = dict(max_steps=3, logging_steps=1, learning_rate=1e-2, beta=0.1)
    model = _model("llama")
    stock = orpo.ORPOTrainer(model=copy.deepcopy(model), args=orpo.ORPOConfig(**{**_COMMON, **options}),
                             train_dataset=_dataset(12), processing_class=_tokenizer())
    expected = _losses(stock)
    got = {}
    for over_prompt in (True, False):
        fused = FusedDPOTrainer(model=copy.deepcopy(model), ref_model=None,
                                args=FusedDPOConfig(**{**_COMMON, **options}, loss_type=["orpo"],
                                                    orpo_nll_over_prompt=over_prompt, kernel_backend="torch"),
                                train_dataset=_dataset(12), processing_class=_tokenizer())
        got[over_prompt] = _losses(fused)
    assert len(expected) == 3
    assert got[True] == pytest.approx(expected, rel=1e-5)
    assert got[False][0] != pytest.approx(expected[0], rel=1e-4)
    with pytest.raises(ValueError, match="orpo_nll_over_prompt=True changes the NLL of loss_type 'orpo'"):
        FusedDPOConfig(**_COMMON, loss_type=["sigmoid"], orpo_nll_over_prompt=True)
