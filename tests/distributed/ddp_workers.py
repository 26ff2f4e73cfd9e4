"""What each rank of ``test_ddp.py`` runs: three DPO training steps of a tiny model under DDP (gloo, CPU), the
patched stock ``DPOTrainer`` or ``FusedDPOTrainer``, saving the logged losses and the final parameters."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

GLOBAL_BATCH = 4


def train_and_save(rank: int, world: int, trainer_kind: str, loss_type: str, out_dir: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import trl

    from dpo_kernels.integrations import trl as dk_trl
    from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer

    common = dict(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=GLOBAL_BATCH // world,
                  report_to=[], use_cpu=True, ddp_backend="gloo", save_strategy="no", max_steps=3, logging_steps=1,
                  learning_rate=1e-3, seed=0, data_seed=0, beta=0.1, loss_type=[loss_type], bf16=False,
                  dataloader_drop_last=True)
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
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save({"losses": losses, "params": params, "initial": initial, "world": dist.get_world_size()},
               os.path.join(out_dir, f"rank{rank}.pt"))
