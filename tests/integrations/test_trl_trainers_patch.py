"""``patch()`` under TRL 1.16's other trainers that route through the fused LM head it replaces
(``add_fused_lm_head``): ``SFTTrainer`` (log-probs, entropy and top-1 for its metrics), ``KTOTrainer`` (policy,
reference and the KL batch), ``GRPOTrainer`` and ``RLOOTrainer`` (generation, untouched by the patch, then the
policy's log-probs; ``beta=0``, so no reference model is loaded from a hub id), with and without the patch on a tiny
random Llama: one fp32 step gives the same loss, gradients and logged metrics, and three training steps the same
logged losses, in fp32 and under bf16 autocast to bf16 accuracy (issue 30)."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional dependency (pip install 'trl==1.16.*')")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"the SFT and KTO trainers run on the fused head from TRL 1.16 (found {trl.__version__})",
                allow_module_level=True)

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402
from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer  # noqa: E402
from dpo_kernels.ops.linear import stored  # noqa: E402

from .test_trl_patch import _count_calls  # noqa: E402

COMMON = dict(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[], use_cpu=True,
              save_strategy="no", max_steps=1, bf16=False)


@pytest.fixture
def restore_trl():
    yield
    dk_trl.unpatch()


def _prompt_completion():
    return synthetic_preferences(8).map(lambda r: {"completion": r["chosen"]}, remove_columns=["chosen", "rejected"])


def _unpaired():
    from datasets import Dataset

    pairs = synthetic_preferences(4)
    rows = [(r["prompt"], r[side], side == "chosen") for r in pairs for side in ("chosen", "rejected")]
    return Dataset.from_dict({"prompt": [p for p, _, _ in rows], "completion": [c for _, c, _ in rows],
                              "label": [d for _, _, d in rows]})


def _step(make_trainer, generates=False):
    trainer = make_trainer()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    if generates:  # sample the same completions in both runs, as the training step would prepare them
        trainer.current_gradient_accumulation_steps = 1
        torch.manual_seed(0)
        batch = trainer._prepare_inputs(batch)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _sft(**config):
    return trl.SFTTrainer(model=tiny_causal_lm("llama"), args=trl.SFTConfig(**{**COMMON, **config}),
                          train_dataset=_prompt_completion(), processing_class=tiny_tokenizer())


def _kto(**config):
    model = tiny_causal_lm("llama")
    return trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=trl.KTOConfig(**{**COMMON, **config}),
                          train_dataset=_unpaired(), processing_class=tiny_tokenizer())


def _digits(completions, **kwargs):
    """A reward that differs between completions (so that the advantages, and the gradients, are not zero)."""
    return [float(sum(int(ch) for ch in c if ch.isdigit())) for c in completions]


def _online(config_cls, trainer_cls):
    def make(**config):
        args = config_cls(**{**COMMON, **config}, num_generations=2, max_completion_length=6, beta=0.0)
        return trainer_cls(model=tiny_causal_lm("llama"), reward_funcs=_digits, args=args,
                           train_dataset=synthetic_preferences(8).remove_columns(["chosen", "rejected"]),
                           processing_class=tiny_tokenizer())
    return make


TRAINERS = {"sft": (_sft, False), "kto": (_kto, False), "grpo": (_online(trl.GRPOConfig, trl.GRPOTrainer), True),
            "rloo": (_online(trl.RLOOConfig, trl.RLOOTrainer), True)}


@pytest.mark.parametrize("schedule", ["auto", "eager"])
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_patched_trainer_matches_stock(trainer, schedule, restore_trl, monkeypatch):
    """One step of each trainer, patched, against stock TRL; ``schedule="eager"``: the trainable head's tiles kept
    from the forward (the per-token eager schedule; on the CPU ``auto`` recomputes them)."""
    make, generates = TRAINERS[trainer]
    dk_trl.unpatch()
    loss, grads, metrics = _step(make, generates)
    dk_trl.patch(backend="torch", schedule=schedule)
    calls = _count_calls(monkeypatch)
    runs, forward = [], stored.forward
    monkeypatch.setattr(stored, "forward", lambda *a: runs.append(1) or forward(*a))
    p_loss, p_grads, p_metrics = _step(make, generates)
    assert calls, f"the patched {trainer} trainer never called dpo_kernels"
    assert bool(runs) == (schedule == "eager"), runs
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == p_grads.keys() and any(g.abs().max() > 0 for g in grads.values())
    for name, g in grads.items():
        err = (p_grads[name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err <= 1e-5, f"{trainer}: gradient of {name} differs by {err:.2e}"
    assert metrics.keys() == p_metrics.keys()
    for name, value in metrics.items():
        if name == "num_tokens":
            assert p_metrics[name] == value
        else:  # rewards and KL are differences of sequence log-probs (~30): bounded relative to those
            assert p_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


def _trained(make, precision):
    """The losses logged over three training steps."""
    trainer = make(max_steps=3, logging_steps=1, bf16=precision == "bf16")
    assert trainer.args.bf16 == (precision == "bf16")
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_patched_trainer_trains_three_steps_as_stock(trainer, precision, restore_trl):
    """Three optimizer steps: the same logged losses as stock, in fp32 to 1e-5 and under bf16 autocast (the trainers'
    default) to bf16 accuracy."""
    make = TRAINERS[trainer][0]
    dk_trl.unpatch()
    expected = _trained(make, precision)
    dk_trl.patch(backend="torch")
    got = _trained(make, precision)
    assert len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-5 if precision == "fp32" else 2e-2, abs=1e-6)
