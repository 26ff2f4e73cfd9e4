"""The DPOConfig switches TRL users turn on for speed and memory, ``precompute_ref_log_probs=True`` and
``padding_free=True``: three fp32 training steps of the patched ``DPOTrainer`` and of ``FusedDPOTrainer`` log the same
values and end on the same weights as stock TRL. And the combinations that cannot work are refused up front."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional dependency")

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402

from .test_trl_patch import FUSED_HEAD, _count_calls, _dataset, _model, _tokenizer  # noqa: E402

_COMMON = dict(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[], use_cpu=True,
               save_strategy="no", beta=0.1, max_steps=3, logging_steps=1, learning_rate=1e-3, bf16=False, seed=0)

# what both trainers log under TRL's names (FusedDPOTrainer adds its own; stock TRL adds logit and entropy summaries)
_CORE_METRICS = ("loss", "grad_norm", "learning_rate", "num_tokens", "rewards/chosen", "rewards/rejected",
                 "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _train(trainer_cls, config_cls, **options):
    """Logged metrics of three steps and the final weights; the same initial model and data for every run."""
    torch.manual_seed(0)
    model = _model("llama")
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=config_cls(**_COMMON, **options),
                          train_dataset=_dataset(12), processing_class=_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 3
    return logged, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _assert_same_training(got, expected):
    (got_logs, got_weights), (logs, weights) = got, expected
    for step, (g, e) in enumerate(zip(got_logs, logs, strict=True)):
        assert set(_CORE_METRICS) <= g.keys(), (step, set(_CORE_METRICS) - g.keys())
        for name in g.keys() & e.keys():
            assert g[name] == pytest.approx(e[name], rel=1e-4, abs=1e-6), (step, name, e[name], g[name])
    for name, w in weights.items():
        torch.testing.assert_close(got_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def restore_trl():
    yield
    dk_trl.unpatch()


@pytest.mark.parametrize("option", [dict(precompute_ref_log_probs=True), dict(padding_free=True)],
                         ids=["precompute_ref_log_probs", "padding_free"])
def test_patched_and_fused_trainers_train_as_stock(option, restore_trl, monkeypatch):
    dk_trl.unpatch()
    stock = _train(trl.DPOTrainer, trl.DPOConfig, **option)

    dk_trl.patch(backend="torch")
    calls = _count_calls(monkeypatch)
    patched = _train(trl.DPOTrainer, trl.DPOConfig, **option, **FUSED_HEAD)
    assert calls, "the patched trainer never called dpo_kernels"
    _assert_same_training(patched, stock)
    dk_trl.unpatch()

    fused = _train(FusedDPOTrainer, FusedDPOConfig, kernel_backend="torch", **option)
    _assert_same_training(fused, stock)


def test_precomputed_reference_is_used_when_asked():
    """With precompute_ref_log_probs the reference model is not run during training: a reference changed after the
    trainer is built must not change the loss."""
    torch.manual_seed(0)
    model = _model("llama")
    trainer = FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model),
                              args=FusedDPOConfig(**_COMMON, precompute_ref_log_probs=True, kernel_backend="torch"),
                              train_dataset=_dataset(12), processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    assert "ref_chosen_logps" in batch
    loss = trainer.compute_loss(trainer.model, batch).detach()
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch).detach(), loss, rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    (dict(loss_type=["tdpo2"]), r"loss_type \['tdpo2'\] needs the reference model's distribution at every token"),
    (dict(loss_type=["sigmoid", "tdpo1"]), r"loss_type \['tdpo1'\] needs"),
    (dict(intermediate_layers=[1]), "reference_at_intermediate_layers=True reads the reference model"),
], ids=["tdpo2", "tdpo1-in-a-mix", "intermediate-layers"])
def test_what_needs_the_reference_model_refuses_precomputed_log_probs(options, message):
    model = _model("llama")
    args = FusedDPOConfig(**_COMMON, precompute_ref_log_probs=True, **options)
    with pytest.raises(ValueError, match=message):
        FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(),
                        processing_class=_tokenizer())
