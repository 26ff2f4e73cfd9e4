"""DeepSpeed ZeRO-3 through accelerate and the Hugging Face Trainer, with DeepSpeed's CPU accelerator (gloo), 2
processes started by the test, every parameter partitioned (the head included): three DPO steps with the patched
stock ``DPOTrainer`` and with ``FusedDPOTrainer`` give the same losses and the same parameters on every rank as one
process (no DeepSpeed) on the same global batch. The head is gathered by ZeRO-3's own hooks for the fused projection
in the forward and again in the backward (``FusedDPOTrainer`` computes it inside the head's forward; the patch
re-enters TRL's gathering context), and its gradient is reduced to the partitions."""

from __future__ import annotations

import importlib.util

import pytest
import torch.distributed as dist

pytest.importorskip("trl", reason="the ZeRO-3 tests train with TRL")

from .test_ddp import assert_same_training, train  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="DeepSpeed is not installed (it installs without a GPU toolchain: "
                              "DS_BUILD_OPS=0 pip install deepspeed)"),
]


@pytest.mark.parametrize("trainer_kind, loss_type", [("patched", "sigmoid"), ("fused", "tdpo2")])
def test_zero3_equals_one_process_on_the_global_batch(tmp_path, trainer_kind, loss_type):
    single = train(tmp_path, 1, trainer_kind, loss_type)[0]
    assert_same_training(single, train(tmp_path, 2, trainer_kind, loss_type, strategy="zero3"))
