"""``FusedDPOTrainer`` (TDPO and intermediate-layer DPO inside TRL 1.14 to 1.16) against MATH.md computed from full
logits, and a PEFT policy whose reference is itself with the adapters disabled."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional dependency")

from dpo_kernels import fused_dpo_loss  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402

from .test_trl_patch import _dataset, _model, _tokenizer  # noqa: E402


def _trainer(model, ref_model, **config):
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[], use_cpu=True,
                          save_strategy="no", max_steps=1, kernel_backend="torch", bf16=False, **config)
    return FusedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(),
                           processing_class=_tokenizer())


def _step(trainer, policy):
    """``(batch, loss, gradients by parameter name)`` of the trainer's first batch; the gradients are then cleared."""
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    return batch, loss, grads


def _assert_grads_match(grads: dict, expected_loss: torch.Tensor, policy) -> None:
    """``grads`` (the trainer's, by parameter name) equal those of ``expected_loss`` to 1e-5 of each one's largest."""
    expected_loss.backward()
    for name, g in grads.items():
        e = policy.get_parameter(name).grad
        assert (g - e).abs().max() <= 1e-5 * max(e.abs().max().item(), 1e-12) + 1e-7, name


def _batch(trainer):
    trainer.model.train()
    return next(iter(trainer.get_train_dataloader()))


def _full_logits(model, batch, layer=None):
    if layer is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hs = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states
    return model.lm_head(model.model.norm(hs[layer]))


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_tdpo_trainer_equals_full_logits(kind, loss_type):
    policy = _model(kind)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = _trainer(policy, ref, loss_type=[loss_type], beta=0.3, alpha=0.7)
    batch, loss, grads = _step(trainer, policy)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        ref_logits = _full_logits(ref, batch)
    # the model's own forward applies Gemma 2's softcap to these logits
    expected = fused_dpo_loss(labels=labels, policy_logits=_full_logits(policy, batch), ref_logits=ref_logits,
                              loss_type=loss_type, beta=0.3, alpha=0.7, shift=True, backend="reference")
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_match(grads, expected.loss, policy)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["kl/chosen"] == pytest.approx(expected.metrics["kl/chosen"], rel=1e-5)
    assert logged["rewards/accuracies"] == expected.metrics["rewards/accuracies"]


@pytest.mark.parametrize(("loss_type", "options"), [("orpo", {}), ("cpo", {"cpo_alpha": 0.6, "label_smoothing": 0.1})])
def test_orpo_and_cpo_trainers_equal_full_logits(loss_type, options):
    """Issue 30: ORPO and CPO through ``FusedDPOTrainer`` (reference-free: no reference model is built), the loss and
    the gradients against the oracle on the policy's full logits. (TRL's own ORPO trainer takes its NLL over prompt
    and response; here it is over the chosen completions' tokens, the ones the log-probs score.)"""
    policy = _model("llama")
    trainer = _trainer(policy, None, loss_type=[loss_type], beta=0.4, **options)
    assert trainer.ref_model is None
    batch, loss, grads = _step(trainer, policy)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    expected = fused_dpo_loss(labels=labels, policy_logits=_full_logits(policy, batch), loss_type=loss_type,
                              beta=0.4, shift=True, backend="reference", **options)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_match(grads, expected.loss, policy)


def test_intermediate_layer_trainer_equals_full_logits():
    policy = _model("llama")
    ref = copy.deepcopy(policy)
    trainer = _trainer(policy, ref, loss_type=["sigmoid"], beta=0.1, intermediate_layers=[1],
                       intermediate_weight=0.4)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        final = fused_dpo_loss(labels=labels, policy_logits=_full_logits(policy, batch),
                               ref_logits=_full_logits(ref, batch), shift=True, backend="reference").loss
        layer1 = fused_dpo_loss(labels=labels, policy_logits=_full_logits(policy, batch, 1),
                                ref_logits=_full_logits(ref, batch, 1), shift=True, backend="reference").loss
    torch.testing.assert_close(loss.detach(), 0.6 * final + 0.4 * layer1, rtol=1e-5, atol=1e-6)
    assert "loss/layer_1" in trainer._metrics["train"]


def test_peft_policy_is_its_own_reference_with_adapters_disabled():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = _trainer(model, None, loss_type=["tdpo2"], beta=0.1)
    loss = trainer.compute_loss(trainer.model, _batch(trainer))
    # LoRA starts as the identity (B = 0): policy == reference, so Delta = 0, K = 0 and the loss is log 2
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert trainer._metrics["train"]["kl/chosen"][-1] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads, "the adapters must receive gradients"


def _mixed_precision_trainer(loss_type, **precision):
    policy = _model("llama")
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    device = "cuda" if precision.get("fp16") else "cpu"
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[],
                          use_cpu=device == "cpu", save_strategy="no", max_steps=3, logging_steps=1,
                          learning_rate=1e-3, loss_type=[loss_type], beta=0.1, **precision)
    return FusedDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=_dataset(16),
                           processing_class=_tokenizer())


@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_bf16_autocast_over_fp32_weights(loss_type):
    """TRL's default precision: the fused loss under bf16 autocast equals the full-logits loss under the same autocast
    (nn.Linear's bf16 logits) to bf16 accuracy, and three real training steps update fp32 master weights."""
    trainer = _mixed_precision_trainer(loss_type, bf16=True)
    policy, ref = trainer.model, trainer.ref_model
    batch = _batch(trainer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(policy, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad():
            expected = fused_dpo_loss(labels=labels, policy_logits=_full_logits(policy, batch),
                                      ref_logits=_full_logits(ref, batch), loss_type=loss_type, beta=0.1, shift=True,
                                      backend="reference")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.loss.item(), rel=2e-2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) for h in logged)
    if loss_type == "tdpo2":
        assert all("kl/chosen" in h for h in logged)
    for name, p in policy.named_parameters():
        assert p.dtype == torch.float32, name
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision (GradScaler) needs a CUDA device")
@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_fp16_autocast_with_grad_scaler(loss_type):
    trainer = _mixed_precision_trainer(loss_type, fp16=True)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) for h in logged)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
