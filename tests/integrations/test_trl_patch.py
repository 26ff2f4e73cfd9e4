"""``dpo_kernels.integrations.trl.patch()``: a stock TRL ``DPOTrainer`` (1.14 to 1.16) gives the same loss, gradients
and logged metrics with and without it (fp32, 1e-5 relative), on tiny random Llama, Qwen2 and Gemma 2 models (no
downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional dependency (pip install 'trl==1.16.*')")
transformers = pytest.importorskip("transformers")

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402
from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer  # noqa: E402

# TRL 1.14's DPOTrainer runs on the fused LM head (the function patch() replaces) only with use_liger_kernel=True,
# which also has transformers put Liger's kernels into the model: liger_kernel_config turns every one of those off
_NO_LIGER_KERNELS = dict.fromkeys(("rope", "cross_entropy", "fused_linear_cross_entropy", "rms_norm", "swiglu", "geglu"),
                                  False)
FUSED_HEAD = (dict(use_liger_kernel=True, liger_kernel_config=_NO_LIGER_KERNELS)
              if trl.__version__.startswith("1.14.") else {})


def _tokenizer():
    return tiny_tokenizer()


def _dataset(n=8, seed=0):
    return synthetic_preferences(n, seed=seed)


def _model(kind: str):
    return tiny_causal_lm(kind)


def _one_step(kind: str, loss_type: str):
    """Loss, parameter gradients and the metrics TRL logged, for the first batch, in fp32 (DPOConfig's default
    bf16 autocast would otherwise round both runs differently)."""
    model = _model(kind)
    args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", beta=0.1, loss_type=[loss_type], max_steps=1, bf16=False,
                         **FUSED_HEAD)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(),
                             processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _count_calls(monkeypatch) -> list:
    """Record every call of the patched fused head (so that an equality with stock TRL cannot be vacuous)."""
    calls, apply = [], dk_trl.FusedLogProbs.apply
    monkeypatch.setattr(dk_trl.FusedLogProbs, "apply", staticmethod(lambda *a, **k: calls.append(1) or apply(*a, **k)))
    return calls


def _assert_same_step(kind: str, stock, patched) -> None:
    """The patched step's ``(loss, gradients, logged metrics)`` against stock TRL's: the loss and every gradient to
    1e-5 (relative to each gradient's size), every metric TRL logs to 1e-5."""
    (loss, grads, metrics), (p_loss, p_grads, p_metrics) = stock, patched
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == p_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        err = (p_grads[name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err <= 1e-5, f"{kind}: gradient of {name} differs by {err:.2e}"
    assert metrics.keys() == p_metrics.keys()
    # Rewards are beta times a difference of two sequence log-probs (~30 in size) that nearly cancel; their error is
    # bounded relative to the log-probs they come from, not to their own (tiny) value.
    logp_scale = max(abs(metrics["logps/chosen"]), abs(metrics["logps/rejected"]), 1.0)
    for name, value in metrics.items():
        if name.startswith("rewards/") and name != "rewards/accuracies":
            assert p_metrics[name] == pytest.approx(value, abs=1e-5 * 0.1 * logp_scale), name
        else:
            assert p_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.fixture
def restore_trl():
    yield
    dk_trl.unpatch()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma2"])
def test_patched_dpo_trainer_matches_stock(kind, loss_type, restore_trl, monkeypatch):
    dk_trl.unpatch()
    stock = _one_step(kind, loss_type)
    dk_trl.patch(backend="torch")
    assert dk_trl.is_patched()
    calls = _count_calls(monkeypatch)
    patched = _one_step(kind, loss_type)
    assert calls, "the patched trainer never called dpo_kernels"
    _assert_same_step(kind, stock, patched)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_the_eager_schedule_under_a_stock_dpo_trainer_matches_stock(kind, restore_trl, monkeypatch):
    """``patch(schedule="eager")``: the policy's trainable head keeps its tiles from the forward (fp32 tiles on the
    CPU) and the backward recomputes none; one step gives stock TRL's loss, gradients and logged metrics."""
    from dpo_kernels.ops.linear import stored

    dk_trl.unpatch()
    stock = _one_step(kind, "sigmoid")
    report = dk_trl.patch(backend="torch", schedule="eager")
    assert report.schedule == "eager"
    runs, forward = [], stored.forward
    monkeypatch.setattr(stored, "forward", lambda *a: runs.append(1) or forward(*a))
    patched = _one_step(kind, "sigmoid")
    assert runs, "the eager schedule never ran"
    _assert_same_step(kind, stock, patched)
    with pytest.raises(ValueError, match="schedule must be one of"):
        dk_trl.patch(schedule="sometimes")


def test_patch_uses_dpo_kernels_and_unpatch_restores(restore_trl):
    import trl.trainer.utils as utils

    original = utils._ChunkedLogProbFunction
    dk_trl.patch()
    assert utils._ChunkedLogProbFunction is dk_trl.FusedLogProbs
    dk_trl.patch()  # idempotent
    dk_trl.unpatch()
    assert utils._ChunkedLogProbFunction is original and not dk_trl.is_patched()


def test_patch_says_what_it_did(restore_trl, caplog):
    """Issue 28: patch() returned None and said nothing."""
    import trl

    with caplog.at_level("INFO", logger="dpo_kernels"):
        report = dk_trl.patch(backend="torch", tile_budget_mb=8)
    assert report.trl_version == trl.__version__ and report.backend == "torch" and report.tile_budget_mb == 8
    assert report.interface in ("two_outputs", "five_outputs") and "trl.trainer.utils" in report.modules
    assert f"TRL {trl.__version__}'s fused LM head" in caplog.text and "backend='torch'" in caplog.text


def test_unsupported_trl_version_is_refused(monkeypatch):
    monkeypatch.setattr(dk_trl.importlib.metadata, "version", lambda name: "1.13.0")
    with pytest.raises(RuntimeError, match="supports TRL 1.14 to 1.16; found TRL 1.13.0, whose DPOTrainer computes"):
        dk_trl.patch()


def test_a_later_trl_with_an_unknown_fused_head_is_refused(monkeypatch):
    import trl.trainer.utils as utils

    class Renamed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, softcap=None, scale=1.0):
            return hidden

    monkeypatch.setattr(dk_trl.importlib.metadata, "version", lambda name: "1.17.0")
    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Renamed)
    with pytest.raises(RuntimeError, match="supports TRL 1.14 to 1.16; found TRL 1.17.0, whose fused LM head"):
        dk_trl.patch()


@pytest.mark.parametrize("transform", [dict(), dict(temperature=0.7, final_logit_softcapping=3.0, logit_scale=1.3)],
                         ids=["plain", "softcap_temperature_scale"])
def test_a_gradient_through_the_entropy_is_exact(transform):
    """Issue 30 (was refused): a loss with an entropy term, as TRL's own function supports it, against float64
    autograd through full logits and against TRL's ChunkedLogProbFunction (TRL >= 1.15, which names it so): the
    gradients of the hidden states, the head and its bias."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:  # TRL 1.14
        ChunkedLogProbFunction = None

    g = torch.Generator().manual_seed(3)
    n, d, v = 11, 8, 37
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.5
    bias, targets = torch.randn(v, generator=g) * 0.2, torch.randint(0, v, (n,), generator=g)
    targets[[2, 7]] = -100
    temperature = transform.get("temperature", 1.0)
    softcap, scale = transform.get("final_logit_softcapping"), transform.get("logit_scale", 1.0)
    weights = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = fn(*leaves)[:2]
        loss = (logp * weights[0].to(dtype)).sum() + (entropy * weights[1].to(dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    def full_logits(h, w, b):
        z = (h @ w.T + b) * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logq = torch.log_softmax(z / temperature, -1)
        mask = targets != -100
        logp = logq.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * mask
        entropy = -(logq.exp() * logq).sum(-1) * mask
        return logp, entropy

    def ours(h, w, b):
        return dk_trl.FusedLogProbs.apply(h, w, b, targets, temperature, 4096, softcap, scale)

    def trls(h, w, b):  # TRL leaves ignored targets to its caller's mask: masked here, as dpo_kernels masks them
        mask = targets != -100
        out = ChunkedLogProbFunction.apply(h, w, b, targets.clamp(min=0), temperature, 4096, softcap, scale,
                                           ("entropy",))
        return out[0] * mask, out[1] * mask

    expected = run(full_logits, torch.float64)
    for name, fn in (("dpo_kernels", ours), ("TRL", trls))[: 2 if ChunkedLogProbFunction is not None else 1]:
        for got, e, what in zip(run(fn, torch.float32), expected, ("hidden", "weight", "bias"), strict=True):
            err = ((got.double() - e).abs().max() / e.abs().max()).item()
            assert err <= 1e-5, f"{name}: d{what} off by {err:.2e}"


def _train_with_default_precision(loss_type, loss_weights):
    """Three logged steps of a stock-configured DPOTrainer: TRL's default DPOConfig is bf16 autocast over fp32 master
    weights (on this CPU too)."""
    model = _model("llama")
    args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_test", per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", beta=0.1, loss_type=loss_type, loss_weights=loss_weights,
                         max_steps=3, logging_steps=1, learning_rate=1e-3, **FUSED_HEAD)
    assert args.bf16, "this test is about TRL's default mixed precision"
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(16),
                             processing_class=_tokenizer())
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "fp32 master weights"
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("loss_type, loss_weights", [(["sigmoid"], None), (["ipo"], None),
                                                     (["sigmoid", "sft"], [1.0, 0.5])], ids=["sigmoid", "ipo", "sft"])
def test_patched_matches_stock_under_the_default_bf16_config(loss_type, loss_weights, restore_trl, monkeypatch):
    """Stock TRL rounds each logits tile to bf16 before folding it; dpo_kernels folds fp32 products of the same bf16
    operands. Both must log the same values to bf16 accuracy, step after step."""
    dk_trl.unpatch()
    stock = _train_with_default_precision(loss_type, loss_weights)
    dk_trl.patch()
    calls = _count_calls(monkeypatch)
    patched = _train_with_default_precision(loss_type, loss_weights)
    assert calls, "the patched trainer never called dpo_kernels"
    assert len(stock) == len(patched) == 3
    for step, (s, p) in enumerate(zip(stock, patched, strict=True)):
        assert s.keys() == p.keys(), step
        logp_scale = max(abs(s["logps/chosen"]), abs(s["logps/rejected"]), 1.0)
        for name, value in s.items():
            if name in ("num_tokens", "learning_rate", "epoch"):
                assert p[name] == value, (step, name)
            elif name.endswith("accuracies"):  # a pair whose margin is a near-tie may flip: one pair of four
                assert abs(p[name] - value) <= 0.25, (step, name)
            elif name.startswith("rewards/"):  # beta x a difference of log-probs that nearly cancel
                assert abs(p[name] - value) <= 2e-2 * 0.1 * logp_scale, (step, name, value, p[name])
            else:
                assert p[name] == pytest.approx(value, rel=2e-2, abs=1e-4), (step, name, value, p[name])


@pytest.mark.parametrize("backend, error", [("tritonn", ValueError), (3, TypeError)])
def test_patch_validates_the_backend_at_once(backend, error, restore_trl):
    """Before, any string was accepted and the first training step failed."""
    with pytest.raises(error, match="backend"):
        dk_trl.patch(backend=backend)
    assert not dk_trl.is_patched()


def test_patch_refuses_an_unavailable_backend_at_once(restore_trl):
    from dpo_kernels.ops.registry import BackendUnavailableError, available_backends

    missing = [name for name, status in available_backends().items() if not status.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    with pytest.raises(BackendUnavailableError, match=missing[0]):
        dk_trl.patch(backend=missing[0])
    dk_trl.patch(backend="torch")
    assert dk_trl.is_patched()


def test_fused_trainer_validates_the_backend_at_construction():
    from dpo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer

    with pytest.raises(ValueError, match="kernel_backend: backend must be one of"):  # when the config is made
        FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, bf16=False,
                       kernel_backend="tritonn")
    model = _model("llama")
    args = FusedDPOConfig(output_dir="/tmp/dpo_kernels_test", report_to=[], use_cpu=True, bf16=False)
    args.kernel_backend = "tritonn"  # set after construction: still refused before training
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(),
                        processing_class=_tokenizer())
