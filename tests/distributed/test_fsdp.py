"""FSDP2 (``fully_shard``, DTensor parameters) on the CPU with gloo, 2 processes started by the test: the fused DPO and
TDPO losses computed as ``FusedDPOTrainer`` computes them (inside the model's and the head's forward) give every
rank gradients that, gathered, equal one process's on the global batch; the head is gathered by FSDP2 for the fused
projection, in the forward and again in the backward, and its gradient reaches the shards."""

from __future__ import annotations

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

from . import fsdp_workers, launch  # noqa: E402


def _fsdp2_unavailable() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "needs torch.distributed with the gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"this torch has no FSDP2 fully_shard ({exc})"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_unavailable() is not None, reason=str(_fsdp2_unavailable()))


@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_fsdp2_step_equals_one_process(loss_type):
    launch.run(fsdp_workers.fsdp_step_checks, 2, loss_type)
