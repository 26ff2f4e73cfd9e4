"""Stock TRL DPOTrainer (1.14 to 1.16) running on dpo_kernels: one call, ``patch()``, before building the trainer.

On TRL 1.15 and 1.16 the DPOTrainer always uses the fused LM head that ``patch()`` replaces; on 1.14 it does so only
with ``use_liger_kernel=True`` (``patch()`` warns once there).

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
