"""``torch.compile(fullgraph=True)`` over a DPO training step's forward (a small backbone and the fused loss) and the
compiled backward: no graph break, and the same loss, gradients and metrics as eager mode. The kernels are
``torch.library`` custom ops under compilation (``dpo_kernels/ops/custom_ops.py``); the label check becomes an in-graph assert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpo_kernels import fused_dpo_loss

from .conftest import backends_under_test

B, T, D, V = 2, 12, 16, 97


class _TinyLM(nn.Module):
    """Embedding, one hidden layer and an untied head: enough for the loss to see real hidden states."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(V, D, generator=g))
        self.layer = nn.Parameter(torch.randn(D, D, generator=g) / D**0.5)
        self.head = nn.Parameter(torch.randn(V, D, generator=g) / D**0.5)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed[input_ids] @ self.layer)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, -3:] = -100  # padding
    return input_ids, labels


def _step(policy: _TinyLM, ref: _TinyLM, input_ids, labels, *, from_logits: bool = False, **options):
    hidden = policy.hidden(input_ids)
    with torch.no_grad():
        ref_hidden = ref.hidden(input_ids)
    if from_logits:
        out = fused_dpo_loss(labels=labels, policy_logits=hidden @ policy.head.T, ref_logits=ref_hidden @ ref.head.T,
                             shift=True, **options)
    else:
        out = fused_dpo_loss(labels=labels, policy_hidden=hidden, lm_head_weight=policy.head, ref_hidden=ref_hidden,
                             ref_lm_head_weight=ref.head, shift=True, **options)
    return out.loss, out.metrics


def _run(compiled: bool, *, compiler: str = "inductor", autocast: bool = False, **options):
    torch._dynamo.reset()
    policy, ref = _TinyLM(0), _TinyLM(1)
    input_ids, labels = _batch()
    step = torch.compile(_step, fullgraph=True, backend=compiler) if compiled else _step
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = step(policy, ref, input_ids, labels, **options)
    loss.backward()  # through the compiled graph's backward (the kernels' backward op inside it)
    grads = {name: p.grad for name, p in policy.named_parameters()}
    return loss.detach(), grads, metrics


def _assert_same_step(compiled, eager, rtol: float):
    (loss, grads, metrics), (e_loss, e_grads, e_metrics) = compiled, eager
    torch.testing.assert_close(loss, e_loss, rtol=rtol, atol=1e-7)
    for name, g in e_grads.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=name)
    assert metrics.keys() == e_metrics.keys()
    for name, value in e_metrics.items():
        assert isinstance(metrics[name], torch.Tensor) and metrics[name].dim() == 0, name  # no host sync in a graph
        assert metrics[name].item() == pytest.approx(value, rel=rtol, abs=1e-6), name


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "tdpo2"])
@pytest.mark.parametrize("from_logits", [False, True], ids=["hidden", "logits"])
def test_compiled_dpo_step_equals_eager(loss_type, from_logits):
    options = dict(loss_type=loss_type, beta=0.1, backend="torch", from_logits=from_logits)
    _assert_same_step(_run(True, **options), _run(False, **options), rtol=1e-5)


@pytest.mark.parametrize("backend", backends_under_test())
def test_every_tile_backend_compiles(backend):
    options = dict(loss_type="tdpo1", beta=0.1, backend=backend)
    _assert_same_step(_run(True, compiler="aot_eager", **options), _run(False, **options), rtol=1e-5)


def test_compiled_step_under_bf16_autocast():
    """TRL's default precision inside the compiled region: the products in bf16 as eager decides them."""
    options = dict(loss_type="sigmoid", beta=0.1, backend="torch", autocast=True)
    _assert_same_step(_run(True, **options), _run(False, **options), rtol=2e-2)


def test_label_check_is_an_assert_inside_the_graph():
    policy, ref = _TinyLM(0), _TinyLM(1)
    input_ids, labels = _batch()
    torch._dynamo.reset()
    step = torch.compile(_step, fullgraph=True, backend="aot_eager")
    step(policy, ref, input_ids, labels, backend="torch")
    labels[2, 6] = V + 5
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 97\) or equal ignore_index=-100"):
        step(policy, ref, input_ids, labels, backend="torch")


@pytest.mark.parametrize("options, message", [
    (dict(backend="reference"), "backend='reference' cannot run under torch.compile"),
    (dict(backend="torch", from_logits=True, inplace_backward=True), "inplace_backward cannot be used under"),
], ids=["reference-backend", "inplace-backward"])
def test_what_cannot_compile_says_so(options, message):
    torch._dynamo.reset()
    policy, ref = _TinyLM(0), _TinyLM(1)
    input_ids, labels = _batch()
    step = torch.compile(_step, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=message):
        step(policy, ref, input_ids, labels, **options)


def test_a_forced_eager_schedule_is_refused_with_its_message_first_and_runs_without_a_gradient():
    """Issue 27: under fullgraph compile a forced schedule='eager' surfaced as Dynamo's "Observed exception" with
    the package's message at the end of its debug context, and under no_grad it failed where eager mode runs."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (4, 6), generator=g)
    h, w = torch.randn(4, 6, D, generator=g, requires_grad=True), torch.randn(V, D, generator=g, requires_grad=True)

    def call(h, w):
        return fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w, loss_type="simpo", backend="torch",
                              schedule="eager").loss

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as err:
        compiled(h, w)
    head = "\n".join(str(err.value).splitlines()[:3])
    assert "schedule='eager' cannot run here: under torch.compile" in head, str(err.value)[:600]
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, w), call(h, w))


def _dynamic_calls(h, w, labels, beta, temperature):
    """The three public entry points that must trace with ``dynamic=True`` (symbolic lengths and float arguments)."""
    loss = fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w, ref_hidden=h.detach() * 0.5,
                          ref_lm_head_weight=w, beta=beta, temperature=temperature, backend="torch").loss
    from dpo_kernels import linear_token_logprobs, token_logprobs

    linear = linear_token_logprobs(h, w, labels, temperature=temperature, backend="torch")
    logits = token_logprobs(h @ w.T, labels, logit_scale=temperature, backend="torch")
    return loss, linear, logits


@pytest.mark.parametrize("length", [5, 9])
def test_dynamic_shapes_and_scalars_trace(length):
    """``torch.compile(fullgraph=True, dynamic=True)``: float arguments become symbolic, and the option checks must
    not call ``math.isfinite`` on them (it failed at every length before)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(length)
    h = torch.randn(2 * B, length, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (2 * B, length), generator=g)
    labels[:, 0] = -100
    compiled = torch.compile(_dynamic_calls, fullgraph=True, dynamic=True, backend="aot_eager")
    for got, expected in zip(compiled(h, w, labels, 0.1, 0.7), _dynamic_calls(h, w, labels, 0.1, 0.7), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# a value other than the default for every TokenOptions field (the ones refused under compilation aside): a field
# added to TokenOptions fails here until it has one, and then must reach the kernels in both modes
_NON_DEFAULT = dict(ignore_index=-7, temperature=0.7, softcap=5.0, logit_scale=1.3, token_chunk_size=4,
                    vocab_chunk_size=16, tile_budget_mb=0.5, grad_filter_eps=0.0, check_labels=False)
_REFUSED_UNDER_COMPILE = {"inplace_backward"}


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_every_option_reaches_the_kernels_in_eager_and_compiled_mode(path, monkeypatch):
    import dataclasses

    from dpo_kernels import TokenOptions, linear_token_logprobs, token_logprobs
    from dpo_kernels.ops.linear import recompute

    fields = {f.name for f in dataclasses.fields(TokenOptions)}
    assert set(_NON_DEFAULT) | _REFUSED_UNDER_COMPILE == fields, "give every new TokenOptions field a value here"
    seen = []

    def recording(module, name):
        original = getattr(module, name)

        def record(*args, **kwargs):
            seen.append(next(a for a in args if isinstance(a, TokenOptions)))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    # eager and compiled alike: inside the path's op (from logits, the torch backend's row kernel itself, which the
    # op calls)
    if path == "hidden":
        recording(recompute, "linear_forward")
    else:
        from dpo_kernels.ops import torch_chunked

        kernels = torch_chunked.KERNELS
        holder = type("Holder", (), {"forward": staticmethod(kernels.logits.forward)})
        recording(holder, "forward")
        monkeypatch.setattr(torch_chunked, "KERNELS", dataclasses.replace(
            kernels, logits=dataclasses.replace(kernels.logits, forward=holder.forward)))
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 9, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[:, 0] = _NON_DEFAULT["ignore_index"]

    def call(h, w, labels):
        if path == "hidden":
            return linear_token_logprobs(h, w, labels, backend="torch", **_NON_DEFAULT)
        options = {k: v for k, v in _NON_DEFAULT.items() if k not in ("vocab_chunk_size", "tile_budget_mb",
                                                                       "grad_filter_eps")}
        return token_logprobs(h @ w.T, labels, backend="torch", **options)

    torch._dynamo.reset()
    eager = call(h, w, labels)
    eager_options, seen[:] = seen[0], []
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(h, w, labels)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert seen and all(options == eager_options for options in seen), (eager_options, seen)


def test_a_frozen_head_forms_the_hidden_gradient_in_the_compiled_forward_too(monkeypatch):
    """Issue 29: under compilation a frozen head (decided when traced) takes the same forward as in eager mode: the
    op returns dH/dlogp and dH/dKL and the backward scales them; values and gradients equal eager mode's."""
    from dpo_kernels import linear_token_logprobs_and_kl
    from dpo_kernels.ops.linear import loop

    calls = []
    original = loop.hidden_grads
    monkeypatch.setattr(loop, "hidden_grads", lambda *a, **k: calls.append(1) or original(*a, **k))

    def call(h, w, hr, wr, labels):
        logp, _, kl = linear_token_logprobs_and_kl(h, w, hr, wr, labels, backend="torch", softcap=3.0,
                                                   vocab_chunk_size=16)
        return logp, kl

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 6, D, generator=g), torch.randn(V, D, generator=g)
    hr, wr = torch.randn(2, 6, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :2] = -100
    up_logp, up_kl = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    results = []
    torch._dynamo.reset()
    for fn in (call, torch.compile(call, fullgraph=True, backend="aot_eager")):
        leaf = h.clone().requires_grad_()
        logp, kl = fn(leaf, w, hr, wr, labels)
        (logp * up_logp + kl * up_kl).sum().backward()
        results.append((logp.detach(), kl.detach(), leaf.grad))
    assert len(calls) == 2, "the frozen-head forward ran in eager and in compiled mode"
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
