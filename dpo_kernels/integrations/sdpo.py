"""Stepwise DPO, sDPO (MATH.md §5), on TRL (1.14 to 1.16).

The preference data is split into ordered chunks. Stage ``t`` trains on chunk ``t`` with the policy continuing from
the model stage ``t-1`` produced and the reference frozen as a copy of that same model (stage 1: the SFT model), so
``L_sDPO = sum_t L_DPO(pi_t, pi_{t-1})``. Each stage's reference log-probs are precomputed once for its chunk
(``precompute_ref_log_probs``), since the reference is frozen within the stage.

Ordering: the paper orders chunks easy to hard by the initial model's accuracy on each data source. With policy and
reference equal at the start every implicit reward is 0, so "accuracy" here is the initial model's ranking accuracy
``logps/accuracies = mean 1[log pi(y_w|x) > log pi(y_l|x)]`` on each chunk (higher = easier).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .trl import make_fused_dpo_classes


@dataclass
class Stage:
    """What one sDPO stage did: its chunk, whether its reference equalled the previous stage's policy at the start
    (when verified), and the trainer's final logged metrics."""

    index: int
    chunk: int
    reference_is_previous_policy: bool | None
    metrics: dict


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def chunk_accuracies(model, chunks: Sequence, args, processing_class) -> list[float]:
    """The model's ranking accuracy (``logps/accuracies``) on each chunk, evaluated with itself as reference."""
    config_cls, trainer_cls = make_fused_dpo_classes()
    eval_args = dataclasses.replace(args, precompute_ref_log_probs=False)
    scores = []
    for chunk in chunks:
        trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=eval_args, train_dataset=chunk,
                              eval_dataset=chunk, processing_class=processing_class)
        scores.append(trainer.evaluate()["eval_logps/accuracies"])
    return scores


def stepwise_dpo(model, chunks: Sequence, *, args, processing_class, order: str = "given",
                 verify_reference: bool = False, trainer_cls=None):
    """Train ``model`` stage by stage on ``chunks`` (a sequence of preference datasets); returns
    ``(model, stages)``.

    ``args`` is a ``FusedDPOConfig`` (or ``DPOConfig`` with ``trainer_cls=trl.DPOTrainer``); its
    ``precompute_ref_log_probs`` is forced on. ``order="easy_to_hard"`` sorts the chunks by :func:`chunk_accuracies`
    of the initial model, descending; ``"given"`` keeps them. ``verify_reference`` compares every stage's reference
    weights with the previous stage's policy (costs one pass over the weights per stage).
    """
    if order not in ("given", "easy_to_hard"):
        raise ValueError(f"order must be 'given' or 'easy_to_hard', got {order!r}")
    if not chunks:
        raise ValueError("chunks must hold at least one preference dataset")
    if trainer_cls is None:
        trainer_cls = make_fused_dpo_classes()[1]
    indices = list(range(len(chunks)))
    if order == "easy_to_hard":
        scores = chunk_accuracies(model, chunks, args, processing_class)
        indices.sort(key=lambda i: -scores[i])
    stage_args = dataclasses.replace(args, precompute_ref_log_probs=True)
    stages = []
    for stage, chunk_index in enumerate(indices, start=1):
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        trainer = trainer_cls(model=model, ref_model=reference, args=stage_args, train_dataset=chunks[chunk_index],
                              processing_class=processing_class)
        same = _same_weights(trainer.ref_model, model) if verify_reference else None
        trainer.train()
        model = trainer.model
        logged = [h for h in trainer.state.log_history if "loss" in h]
        stages.append(Stage(stage, chunk_index, same, logged[-1] if logged else {}))
    return model, stages
