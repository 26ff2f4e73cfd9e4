"""sDPO: each stage's reference equals the previous stage's policy at the stage start; chunk ordering."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional dependency")

from dpo_kernels.integrations.sdpo import chunk_accuracies, stepwise_dpo  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402

from .test_trl_patch import _dataset, _model, _tokenizer  # noqa: E402


def _args(**overrides):
    options = dict(output_dir="/tmp/dpo_kernels_sdpo", per_device_train_batch_size=4, report_to=[], use_cpu=True,
                   save_strategy="no", max_steps=2, learning_rate=5e-3, bf16=False, kernel_backend="torch",
                   logging_steps=1)
    return FusedDPOConfig(**(options | overrides))


class RecordingTrainer(FusedDPOTrainer):
    """Snapshots, at construction, the reference it was given and the policy it starts from."""

    starts: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.starts.append((copy.deepcopy(self.ref_model.state_dict()),
                                        copy.deepcopy(self.model.state_dict())))


def test_stage_references_are_previous_policies():
    model = _model("llama")
    initial = copy.deepcopy(model.state_dict())
    chunks = [_dataset(8, seed=s) for s in (1, 2, 3)]
    RecordingTrainer.starts = []
    model, stages = stepwise_dpo(model, chunks, args=_args(), processing_class=_tokenizer(),
                                 verify_reference=True, trainer_cls=RecordingTrainer)
    assert [s.reference_is_previous_policy for s in stages] == [True, True, True]
    assert len(RecordingTrainer.starts) == 3
    for i, (ref_state, policy_state) in enumerate(RecordingTrainer.starts):
        # at every stage start, the reference is the policy the stage starts from ...
        assert all(torch.equal(ref_state[k], policy_state[k]) for k in ref_state)
        # ... which is the SFT model for stage 1, and the (trained, so different) result of the stage before
        previous = initial if i == 0 else RecordingTrainer.starts[i - 1][0]
        same_as_previous = all(torch.equal(ref_state[k], previous[k]) for k in ref_state)
        assert same_as_previous == (i == 0)
    assert all("loss" in s.metrics for s in stages)


def test_easy_to_hard_order_uses_initial_ranking_accuracy():
    model = _model("llama")
    chunks = [_dataset(8, seed=s) for s in (4, 5)]
    scores = chunk_accuracies(model, chunks, _args(), _tokenizer())
    assert all(0.0 <= s <= 1.0 for s in scores)
    _, stages = stepwise_dpo(model, chunks, args=_args(max_steps=1), processing_class=_tokenizer(),
                             order="easy_to_hard")
    expected = sorted(range(2), key=lambda i: -scores[i])
    assert [s.chunk for s in stages] == expected
    with pytest.raises(ValueError, match="order must be"):
        stepwise_dpo(model, chunks, args=_args(), processing_class=_tokenizer(), order="random")
