"""DDP (gloo, CPU, 2 processes started by the test): three DPO steps of a tiny Llama with the patched stock
``DPOTrainer`` and with ``FusedDPOTrainer`` give the same losses and the same parameters on every rank, equal to one
process on the same global batch (gradients all-reduced like any other parameter's)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl", reason="the DDP tests train with TRL")

from . import launch, trainer_workers  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def train(tmp_path, world: int, trainer_kind: str, loss_type: str, strategy: str = "ddp") -> list[dict]:
    out = tmp_path / f"{trainer_kind}-{loss_type}-{strategy}-{world}"
    out.mkdir()
    launch.run(trainer_workers.train_and_save, world, trainer_kind, loss_type, str(out), strategy, threads=1)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def assert_same_training(single: dict, ranks: list[dict]) -> None:
    """Every rank has the same losses and parameters as one process on the global batch, and the head moved."""
    assert len(single["losses"]) == 3
    for r in ranks:
        assert r["world"] == len(ranks)
        for name, p in r["params"].items():
            assert torch.equal(p, ranks[0]["params"][name]), f"rank parameters differ: {name}"
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-4)
    for name, p in ranks[0]["params"].items():
        s = single["params"][name]
        err = (p - s).abs().max().item() / max(s.abs().max().item(), 1e-12)
        assert err <= 1e-4, f"{name}: distributed parameters differ from one process by {err:.2e}"
    assert not torch.equal(ranks[0]["params"]["lm_head.weight"], ranks[0]["initial"]["lm_head.weight"]), \
        "the head was trained"


@pytest.mark.parametrize("trainer_kind, loss_type", [("patched", "sigmoid"), ("fused", "tdpo2")])
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, trainer_kind, loss_type):
    assert_same_training(train(tmp_path, 1, trainer_kind, loss_type)[0], train(tmp_path, 2, trainer_kind, loss_type))
