"""Vocabulary-parallel primitives and ``fused_dpo_loss`` on 2 and 4 gloo processes (CPU), started by the test:
every rank's outputs and gradients equal one process with the whole vocabulary, to 1e-6 in fp32, for uneven slices,
masked tokens, softcap and temperature, a bias, a reference head or reference logits, sigmoid DPO and TDPO2, on every
backend that runs on the CPU (the Triton kernels through the interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import dpo_kernels
from dpo_kernels.ops import backends_for

from . import launch, vocab_parallel_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process(world):
    launch.run(vocab_parallel_workers.vocab_parallel_checks, world, backends_for("cpu"))


def test_the_scaled_store_over_a_vocabulary_slice_equals_one_process():
    launch.run(vocab_parallel_workers.scaled_store_checks, 2, backends_for("cpu"))


def test_dtensor_head_is_vocab_parallel_and_data_parallel_use_is_refused():
    launch.run(vocab_parallel_workers.dtensor_checks, 2, "torch")


def test_vocab_parallel_needs_an_initialised_group_and_a_tile_kernel_backend():
    logits, labels = torch.randn(1, 3, 5), torch.tensor([[0, 1, 2]])
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        dpo_kernels.token_logprobs(logits, labels, vocab_parallel_group=object())


def _reference_backend_refuses(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="backend='reference' is the single-process oracle"):
        dpo_kernels.token_logprobs(torch.randn(1, 3, 5), torch.tensor([[0, 1, 2]]), backend="reference",
                                   vocab_parallel_group=dist.group.WORLD)


def test_reference_backend_refuses_vocab_parallel():
    launch.run(_reference_backend_refuses, 2)


def test_plain_tensor_heads_refuse_ranks_with_different_inputs():
    launch.run(vocab_parallel_workers.plain_tensor_consistency_checks, 2, "torch")
