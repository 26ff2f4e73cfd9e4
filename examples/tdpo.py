"""Token-level DPO (TDPO2) in TRL: policy log-probs, reference log-probs and the per-token KL(ref || policy) in one
fused pass from both models' hidden states.

    python examples/tdpo.py
"""

import copy

from _common import TRAINER_OPTIONS, report, synthetic_preferences, tiny_causal_lm, tiny_tokenizer

from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer

model = tiny_causal_lm("qwen2")
args = FusedDPOConfig(loss_type=["tdpo2"], beta=0.1, alpha=0.5, **TRAINER_OPTIONS)
trainer = FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=synthetic_preferences(64), processing_class=tiny_tokenizer())
trainer.train()
report(trainer, keys=("loss", "rewards/accuracies", "kl/chosen", "kl/rejected"))
