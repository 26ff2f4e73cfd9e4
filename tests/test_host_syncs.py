"""Host syncs per fused call, counted: at most one on the default paths (the labels' one host read of
``dpo_kernels.host_read``), none in a backward, and the metrics read once, when they are looked at.

On this CPU nothing waits, so the points where a GPU would wait are counted instead: every op that copies a value
to the host (``aten._local_scalar_dense``: ``item``, ``bool``, ``int``, ``float``), every op whose output size
depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``unique``) and ``Tensor.tolist``."""

from __future__ import annotations

import json

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_kernels import fused_dpo_loss, intermediate_dpo_loss, linear_token_logprobs
from dpo_kernels.metrics import PendingMetrics

from .conftest import skip_if_unsupported

B, T, V, D = 2, 12, 97, 16
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}


class _Syncs(TorchDispatchMode):
    """Counts the host syncs a GPU would make, by name, over the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._functions = _ToList(self.seen)

    def __enter__(self):
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._functions.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in _DATA_DEPENDENT:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            self.seen.append(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
                and len(args) < 2:
            self.seen.append(name)
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.seen)


class _ToList(TorchFunctionMode):
    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.seen.append("tolist")
        return func(*args, **(kwargs or {}))


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[1, 8:] = -100
    return dict(
        labels=labels,
        policy_hidden=torch.randn(2 * B, T, D, generator=g, dtype=dtype).requires_grad_(),
        lm_head_weight=(torch.randn(V, D, generator=g, dtype=dtype) * 0.3).requires_grad_(),
        ref_hidden=torch.randn(2 * B, T, D, generator=g, dtype=dtype),
        ref_lm_head_weight=torch.randn(V, D, generator=g, dtype=dtype) * 0.3,
    )


def test_the_counter_sees_each_kind_of_sync():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with _Syncs() as syncs:
        x[0].item(), bool(x.any()), x.tolist(), x.nonzero(), x[mask], torch.nonzero_static(mask, size=3)
    assert syncs.seen == ["_local_scalar_dense", "_local_scalar_dense", "tolist", "nonzero",
                          "index with a boolean mask"]


CASES = {
    "sigmoid, eager": dict(loss_type="sigmoid"),
    "sigmoid, recompute": dict(loss_type="sigmoid", schedule="recompute"),
    "tdpo2, eager": dict(loss_type="tdpo2"),
    "tdpo2, recompute": dict(loss_type="tdpo2", schedule="recompute"),
    "several groups": dict(loss_type="sigmoid", eager_budget_mb=2 * T * V * 4 / 2**20),
    "unshifted labels checked": dict(loss_type="ipo", shift=False),
    "use_weighting": dict(loss_type="sigmoid", use_weighting=True, schedule="recompute"),
}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_fused_dpo_call_syncs_once_and_its_backward_never(case, backend):
    skip_if_unsupported(backend, torch.float32)
    d = _data()
    with _Syncs() as forward:
        out = fused_dpo_loss(**d, backend=backend, **CASES[case])
    with _Syncs() as backward:
        out.loss.backward()
    assert forward.count == 1, forward.seen
    assert backward.count == 0, backward.seen
    with _Syncs() as metrics:
        values = dict(out.metrics)
    assert metrics.seen == ["tolist"]
    assert values["rewards/chosen"] == pytest.approx(out.chosen_rewards.mean().item(), rel=1e-6)


def test_forward_only_and_the_primitive_sync_once():
    d = _data()
    with torch.no_grad(), _Syncs() as syncs:
        fused_dpo_loss(**d, backend="torch")
    assert syncs.count == 1, syncs.seen
    with _Syncs() as syncs:
        logps = linear_token_logprobs(d["policy_hidden"], d["lm_head_weight"], d["labels"], backend="torch")
        logps.sum().backward()
    assert syncs.count == 1, syncs.seen


def test_intermediate_dpo_syncs_once_per_layer_call_and_reads_its_metrics_once():
    d = _data()
    layers = {1: torch.randn(2 * B, T, D, requires_grad=True)}
    with _Syncs() as syncs:
        out = intermediate_dpo_loss(labels=d["labels"], policy_hidden=d["policy_hidden"],
                                    lm_head_weight=d["lm_head_weight"], policy_layer_hidden=layers,
                                    ref_hidden=d["ref_hidden"], ref_lm_head_weight=d["ref_lm_head_weight"],
                                    backend="torch")
        out.loss.backward()
    assert syncs.count == 2, syncs.seen  # the final layer's call and layer 1's
    with _Syncs() as syncs:
        assert set(out.metrics) >= {"loss/final", "loss/intermediate", "loss/layer_1", "rewards/chosen"}
    assert syncs.seen == ["tolist"]  # the first look reads every value at once
    with _Syncs() as syncs:
        assert out.metrics["loss/layer_1"] == pytest.approx(out.metrics["loss/intermediate"])
    assert syncs.count == 0


def test_the_trl_fused_head_syncs_once():
    trl_patch = pytest.importorskip("dpo_kernels.integrations.trl")
    d = _data()
    hidden, targets = d["policy_hidden"][0], d["labels"][0]
    with _Syncs() as syncs:
        out = trl_patch.FusedLogProbs.apply(hidden, d["lm_head_weight"], None, targets, 1.0, 64)
        out[0].sum().backward()
    assert syncs.count == 1, syncs.seen


def test_pending_metrics_read_every_value_once_into_a_plain_dict():
    values = {"a": torch.tensor(1.5), "b": torch.tensor([2.0]), "c": 3}
    metrics = PendingMetrics(values)
    metrics.add({"d": torch.tensor(4.0, dtype=torch.float64)})
    with _Syncs() as syncs:
        read = metrics.read()
        assert read == {"a": 1.5, "b": 2.0, "c": 3.0, "d": 4.0}
        assert metrics.read() is read
    assert syncs.seen == ["tolist"]
    assert type(read) is dict and all(type(v) is float for v in read.values())
    metrics.add({"e": torch.tensor(5.0)})  # added after the read: read again, with the new value
    assert metrics.read() == {"a": 1.5, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}


def test_dpo_metrics_are_a_plain_dict_of_floats_for_json_and_loggers():
    d = _data()
    out = fused_dpo_loss(**d, backend="torch", loss_type="tdpo2")
    metrics = out.metrics
    assert type(metrics) is dict and out.metrics is metrics
    assert all(type(v) is float for v in metrics.values())
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["kl/chosen"] == pytest.approx(out.chosen_kl.mean().item(), rel=1e-6)
