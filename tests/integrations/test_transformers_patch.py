"""``dpo_kernels.integrations.transformers`` on tiny random Llama, Qwen2 and Gemma 2 models (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_kernels.integrations import synthetic  # noqa: E402
from dpo_kernels.integrations.transformers import (  # noqa: E402
    causal_lm_hidden_states,
    logit_transform,
    patch_causal_lm,
    unpatch_causal_lm,
)

KINDS = ["llama", "mistral", "qwen2", "gemma2"]


def tiny_causal_lm(kind: str):
    """Three layers and a strong Gemma 2 softcap (5), so that layers and the transform matter; vocabulary 97."""
    return synthetic.tiny_causal_lm(kind, words=95, layers=3, softcap=5.0).eval()


def _batch(vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    return ids, labels


def _manual_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lp = logits[:, :-1].float().log_softmax(-1)
    y = labels[:, 1:]
    return lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)


@pytest.mark.parametrize("kind", KINDS)
def test_patched_forward_equals_full_logits(kind):
    model = tiny_causal_lm(kind)
    ids, labels = _batch()
    stock = model(ids, labels=labels)  # the model's own logits (Gemma 2 softcaps them) and loss
    expected = _manual_token_logps(stock.logits, labels)
    stock.loss.backward()
    stock_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    patch_causal_lm(model, backend="torch")
    out = model(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.token_logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        g = stock_grads[name]
        err = (p.grad - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err <= 1e-5, f"{kind} {name}: gradient differs by {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_generation_and_plain_forward_are_unchanged(kind):
    model = tiny_causal_lm(kind)
    ids, _ = _batch()
    before = model.generate(ids, max_new_tokens=5, do_sample=False)
    logits_before = model(ids).logits
    patch_causal_lm(model)
    torch.testing.assert_close(model(ids).logits, logits_before)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), before)
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("apply_final_norm", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_intermediate_layers_through_the_head(kind, apply_final_norm):
    model = tiny_causal_lm(kind)
    ids, labels = _batch()
    patch_causal_lm(model, backend="torch", intermediate_layers=[1, 2, 3], apply_final_norm=apply_final_norm)
    out = model(ids, labels=labels)
    hs = model.model(ids, output_hidden_states=True).hidden_states
    transform = logit_transform(model.config)
    for k in (1, 2, 3):
        h = model.model.norm(hs[k]) if apply_final_norm and k < 3 else hs[k]
        logits = model.lm_head(h)
        if transform["softcap"]:
            logits = transform["softcap"] * torch.tanh(logits / transform["softcap"])
        torch.testing.assert_close(out.layer_token_logps[k], _manual_token_logps(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.layer_token_logps[3], out.token_logps)


def test_config_transforms_and_bad_layers():
    assert logit_transform(tiny_causal_lm("gemma2").config) == {"softcap": 5.0, "logit_scale": 1.0}
    assert logit_transform(tiny_causal_lm("llama").config) == {"softcap": None, "logit_scale": 1.0}
    granite = transformers.GraniteConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, logits_scaling=4.0)
    assert logit_transform(granite)["logit_scale"] == 0.25
    with pytest.raises(ValueError, match="layers must be decoder layers in \\[1, 3\\]"):
        causal_lm_hidden_states(tiny_causal_lm("llama"), torch.ones(1, 3, dtype=torch.long), layers=[4])


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32_weights", "bf16_weights"])
def test_patched_forward_under_bf16_autocast(model_dtype):
    """bf16 autocast over fp32 weights (a trainer's default), or a model loaded in bf16: the fused head agrees with the
    model's own logits to bf16 accuracy and its gradients come back in the parameters' dtype."""
    model = tiny_causal_lm("llama").to(model_dtype)
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _manual_token_logps(model(ids).logits, labels)
        patch_causal_lm(model)
        out = model(ids, labels=labels)
    out.loss.backward()
    scale = expected.abs().max().item()
    assert (out.token_logps - expected).abs().max().item() <= 2e-2 * scale
    assert all(p.grad is not None and p.grad.dtype == model_dtype for p in model.parameters() if p.requires_grad)
