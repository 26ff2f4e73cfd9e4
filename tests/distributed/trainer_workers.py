"""What each rank of ``test_ddp.py`` and ``test_zero3.py`` runs: three DPO training steps of a tiny model on the CPU
(gloo) under DDP or DeepSpeed ZeRO-3 (one process: neither), with the patched stock ``DPOTrainer`` or
``FusedDPOTrainer``, saving the logged losses and the final parameters (gathered, under ZeRO-3)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

GLOBAL_BATCH = 4


# ZeRO-3 with every parameter partitioned, however small (the tiny model's would otherwise stay whole)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
         "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}}


def train_and_save(rank: int, world: int, trainer_kind: str, loss_type: str, out_dir: str,
                   strategy: str = "ddp") -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import trl

    from dpo_kernels.integrations import trl as dk_trl
    from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer

    common = dict(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=GLOBAL_BATCH // world,
                  report_to=[], use_cpu=True, ddp_backend="gloo", save_strategy="no", max_steps=3, logging_steps=1,
                  learning_rate=1e-3, seed=0, data_seed=0, beta=0.1, loss_type=[loss_type], bf16=False,
                  dataloader_drop_last=True)
    if strategy == "zero3" and world > 1:
        common["deepspeed"] = ZERO3
    model = tiny_causal_lm("llama")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if trainer_kind == "patched":
        dk_trl.patch()
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**common),
                                 train_dataset=synthetic_preferences(24), processing_class=tiny_tokenizer())
    else:
        trainer = dk_trl.FusedDPOTrainer(model=model, ref_model=ref, args=dk_trl.FusedDPOConfig(**common),
                                         train_dataset=synthetic_preferences(24), processing_class=tiny_tokenizer())
    initial = _parameters(model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    params = _parameters(model)
    torch.save({"losses": losses, "params": params, "initial": initial, "world": dist.get_world_size()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered from the ZeRO-3 partitions when there are any)."""
    params = list(model.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in params):
        return {n: p.detach().clone() for n, p in params}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}
