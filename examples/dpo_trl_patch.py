"""Stock TRL 1.16 DPOTrainer running on dpo_kernels: one call, ``patch()``, before building the trainer.

    python examples/dpo_trl_patch.py
"""

import copy

from _common import TRAINER_OPTIONS, report, synthetic_preferences, tiny_causal_lm, tiny_tokenizer
from trl import DPOConfig, DPOTrainer

from dpo_kernels.integrations import trl as dk_trl

dk_trl.patch()  # TRL's fused LM head now computes its log-probs with dpo_kernels (backend="auto")
model = tiny_causal_lm("llama")
trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(beta=0.1, **TRAINER_OPTIONS),
                     train_dataset=synthetic_preferences(64), processing_class=tiny_tokenizer())
trainer.train()
report(trainer)
dk_trl.unpatch()
