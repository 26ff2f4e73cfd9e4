"""Intermediate-layer DPO: L = (1 - lambda) L_final + lambda mean_k L_k, each layer through the shared head (and
final norm), the reference read at the same layers.

    python examples/intermediate_dpo.py
"""

import copy

from _common import TRAINER_OPTIONS, report, synthetic_preferences, tiny_causal_lm, tiny_tokenizer

from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer

model = tiny_causal_lm("llama", layers=4)
args = FusedDPOConfig(loss_type=["sigmoid"], beta=0.1, intermediate_layers=[2, 3], intermediate_weight=0.3,
                      **TRAINER_OPTIONS)
trainer = FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=synthetic_preferences(64), processing_class=tiny_tokenizer())
trainer.train()
report(trainer, keys=("loss", "loss/final", "loss/layer_2", "loss/layer_3", "rewards/accuracies"))
