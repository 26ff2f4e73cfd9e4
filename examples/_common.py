"""Shared set-up of the examples: a tiny random model, its tokenizer, synthetic preferences and trainer options."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built in code

from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer  # noqa: E402,F401

TRAINER_OPTIONS = dict(output_dir="/tmp/dpo_kernels_examples", per_device_train_batch_size=8, max_steps=20,
                       learning_rate=5e-3, logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                       bf16=False, disable_tqdm=True)


def report(trainer, keys=("loss", "rewards/accuracies", "rewards/margins")) -> None:
    for entry in trainer.state.log_history:
        if "loss" in entry:
            shown = ", ".join(f"{k}={entry[k]:.4f}" for k in keys if k in entry)
            print(f"step {entry['step']:>3}: {shown}")
