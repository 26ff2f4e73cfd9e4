"""Stepwise DPO (sDPO): two chunks from two sources, ordered easy to hard by the initial model's ranking accuracy;
each stage's reference is the model the previous stage produced.

    python examples/sdpo.py
"""

import dataclasses

from _common import TRAINER_OPTIONS, synthetic_preferences, tiny_causal_lm, tiny_tokenizer

from dpo_kernels.integrations.sdpo import stepwise_dpo
from dpo_kernels.integrations.trl import FusedDPOConfig

chunks = [synthetic_preferences(32, seed=1, source="a"), synthetic_preferences(32, seed=2, source="b")]
args = dataclasses.replace(FusedDPOConfig(beta=0.1, **TRAINER_OPTIONS), max_steps=8)
model, stages = stepwise_dpo(tiny_causal_lm("llama"), chunks, args=args, processing_class=tiny_tokenizer(),
                             order="easy_to_hard", verify_reference=True)
for stage in stages:
    print(f"stage {stage.index}: chunk {stage.chunk} (source {chunks[stage.chunk][0]['source']}), reference is the "
          f"previous policy: {stage.reference_is_previous_policy}, last loss {stage.metrics.get('loss', float('nan')):.4f}")
