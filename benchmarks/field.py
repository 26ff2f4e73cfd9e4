"""The cases, shape presets and implementations compared by ``benchmarks/test_field.py`` and ``benchmarks/report.py``.

Cases (inputs per preset; ``N`` tokens, ``V`` vocabulary, ``D`` hidden size):

- ``logprobs``: per-token log-probs from logits ``[N, V]``;
- ``logprobs_kl``: log-probs, reference log-probs and KL(ref || policy) from two logits tensors;
- ``linear_logprobs``: per-token log-probs from hidden states ``[N, D]`` and a head ``[V, D]``;
- ``linear_logprobs_kl``: the same with a reference head, plus the KL;
- ``linear_nll``: the mean negative log-likelihood (cross-entropy) of the tokens from hidden states and a head;
- ``dpo``: the sigmoid DPO loss from policy and reference hidden states (``N = 2B x T``);
- ``tdpo``: the TDPO2 loss from the same.

Implementations: every available dpo_kernels backend for the device (``dpo_kernels[<backend>]``), the ``naive`` path
(full logits, log_softmax, gather, autograd: what trainers did before fused heads), and the field where installed
(the ``bench`` extra): TRL 1.16's chunked log-prob and chunked divergence functions, Liger-Kernel's fused linear DPO
loss, cut-cross-entropy's ``linear_cross_entropy`` (``reduction="none"`` and ``"mean"``), and PyTorch's own
``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) with its chunked options, the same two reductions.
Every implementation's output is checked against dpo_kernels' before it is timed, so a fast wrong answer cannot win.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import dpo_kernels

CASES = ("logprobs", "logprobs_kl", "linear_logprobs", "linear_logprobs_kl", "linear_nll", "dpo", "tdpo")
LINEAR_CASES = ("linear_logprobs", "linear_logprobs_kl", "linear_nll", "dpo", "tdpo")


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    tokens: tuple[int, ...]
    vocab: int
    hidden: int
    dtype: torch.dtype
    seq: int = 256  # tokens per sequence for the DPO cases


PRESETS = {
    "cpu": Preset("cpu", "cpu", (512, 1024, 2048), 32000, 256, torch.float32),
    "llama3": Preset("llama3", "cuda", (4096, 8192, 16384), 128256, 4096, torch.bfloat16, seq=1024),
    "gemma2": Preset("gemma2", "cuda", (4096, 8192, 16384), 256000, 2304, torch.bfloat16, seq=1024),
}


def make_inputs(case: str, preset: Preset, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dev, dt, v, d = preset.device, preset.dtype, preset.vocab, preset.hidden

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)

    if case in ("logprobs", "logprobs_kl"):
        return {"logits": randn(tokens, v, scale=3.0), "ref_logits": randn(tokens, v, scale=3.0),
                "labels": torch.randint(0, v, (tokens,), generator=g).to(dev)}
    if case in ("dpo", "tdpo"):
        rows, seq = max(2, 2 * (tokens // (2 * preset.seq))), preset.seq
        labels = torch.randint(0, v, (rows, seq), generator=g)
        labels[:, : seq // 4] = -100  # prompts
        return {"hidden": randn(rows, seq, d), "weight": randn(v, d, scale=d**-0.5), "ref_hidden": randn(rows, seq, d),
                "ref_weight": randn(v, d, scale=d**-0.5), "labels": labels.to(dev)}
    return {"hidden": randn(tokens, d), "weight": randn(v, d, scale=d**-0.5), "ref_hidden": randn(tokens, d),
            "ref_weight": randn(v, d, scale=d**-0.5), "labels": torch.randint(0, v, (tokens,), generator=g).to(dev)}


# --------------------------------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Impl:
    """One implementation of one case: ``run(inputs) -> output`` (differentiable in the policy inputs)."""

    name: str
    case: str
    run: Callable[[dict], torch.Tensor]
    requires: str | None = None  # module that must be importable
    devices: tuple[str, ...] = ("cpu", "cuda")
    missing: Callable[[], str | None] | None = None  # why it cannot run with what is installed, else None

    def unavailable(self, device: str) -> str | None:
        if device not in self.devices:
            return f"{self.name} does not run on {device}"
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install -e '.[bench]')"
        return None if self.missing is None else self.missing()


def _naive_logps(logits, labels):
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def _naive_kl(logits, ref_logits):
    lp, rlp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    return (rlp.exp() * (rlp - lp)).sum(-1)


def _ours(case: str, backend: str) -> Callable[[dict], torch.Tensor]:
    def run(x):
        if case == "logprobs":
            return dpo_kernels.token_logprobs(x["logits"], x["labels"], backend=backend)
        if case == "logprobs_kl":
            logp, _, kl = dpo_kernels.token_logprobs_and_kl(x["logits"], x["ref_logits"], x["labels"], backend=backend)
            return torch.stack([logp, kl])
        if case == "linear_logprobs":
            return dpo_kernels.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], backend=backend)
        if case == "linear_logprobs_kl":
            logp, _, kl = dpo_kernels.linear_token_logprobs_and_kl(x["hidden"], x["weight"], x["ref_hidden"],
                                                                   x["ref_weight"], x["labels"], backend=backend)
            return torch.stack([logp, kl])
        if case == "linear_nll":
            logp = dpo_kernels.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], backend=backend)
            return -logp.sum() / (x["labels"] != -100).sum()
        return dpo_kernels.fused_dpo_loss(
            labels=x["labels"], policy_hidden=x["hidden"], lm_head_weight=x["weight"], ref_hidden=x["ref_hidden"],
            ref_lm_head_weight=x["ref_weight"], loss_type="sigmoid" if case == "dpo" else "tdpo2", backend=backend,
        ).loss
    return run


def _naive(case: str) -> Callable[[dict], torch.Tensor]:
    def run(x):
        if case == "logprobs":
            return _naive_logps(x["logits"], x["labels"])
        if case == "logprobs_kl":
            return torch.stack([_naive_logps(x["logits"], x["labels"]), _naive_kl(x["logits"], x["ref_logits"].detach())])
        logits = x["hidden"] @ x["weight"].T
        if case == "linear_logprobs":
            return _naive_logps(logits, x["labels"])
        if case == "linear_nll":
            return torch.nn.functional.cross_entropy(logits.float(), x["labels"])
        ref_logits = (x["ref_hidden"] @ x["ref_weight"].T).detach()
        if case == "linear_logprobs_kl":
            return torch.stack([_naive_logps(logits, x["labels"]), _naive_kl(logits, ref_logits)])
        return dpo_kernels.fused_dpo_loss(labels=x["labels"], policy_logits=logits, ref_logits=ref_logits,
                                          loss_type="sigmoid" if case == "dpo" else "tdpo2", backend="reference").loss
    return run


def _trl_logprobs(x):
    from trl.kernels import ChunkedLogProbFunction

    out = ChunkedLogProbFunction.apply(x["hidden"], x["weight"], None, x["labels"], 1.0, 32768, None, 1.0,
                                       ("log_probs",))
    return out[0]


def _trl_logprobs_kl(x):
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    logp = ChunkedLogProbFunction.apply(x["hidden"], x["weight"], None, x["labels"], 1.0, 32768, None, 1.0,
                                        ("log_probs",))[0]
    # beta = 0: forward KL(teacher || student), the reference being the teacher
    kl = ChunkedDivergenceFunction.apply(x["hidden"], x["weight"], None, x["ref_hidden"], x["ref_weight"], None, 0.0)[0]
    return torch.stack([logp, kl])


def _cce_logprobs(x):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if x["hidden"].is_cuda else "torch_compile"
    return -linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none", impl=impl)


def _cce_nll(x):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if x["hidden"].is_cuda else "torch_compile"
    return linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="mean", impl=impl)


def _torch_lce_missing() -> str | None:
    if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13)"


def _torch_lce(reduction: str):
    """PyTorch's own fused head: ``LinearCrossEntropyOptions()`` opts in to its chunked path (``options=None`` would
    build the full logits), with its per-device defaults."""
    def run(x):
        loss = torch.nn.functional.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction=reduction,
                                                        options=torch.nn.LinearCrossEntropyOptions())
        return -loss if reduction == "none" else loss
    return run


def _liger_dpo(x):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=x["hidden"].is_cuda)
    out = loss_fn(x["weight"], x["hidden"], x["labels"], ref_input=x["ref_hidden"], ref_weight=x["ref_weight"])
    return out[0] if isinstance(out, tuple) else out


def implementations(case: str) -> list[Impl]:
    """Every implementation of ``case`` this module knows, available here or not."""
    impls = [Impl(f"dpo_kernels[{name}]", case, _ours(case, name), devices=(dev,))
             for name, dev in (("cpu", "cpu"), ("torch", "cpu"), ("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda"))]
    impls.append(Impl("naive", case, _naive(case)))
    if case == "linear_logprobs":
        impls += [Impl("trl-1.16 chunked_logprob", case, _trl_logprobs, requires="trl"),
                  Impl("cut-cross-entropy", case, _cce_logprobs, requires="cut_cross_entropy"),
                  Impl("torch F.linear_cross_entropy", case, _torch_lce("none"), missing=_torch_lce_missing)]
    if case == "linear_nll":
        impls += [Impl("cut-cross-entropy", case, _cce_nll, requires="cut_cross_entropy"),
                  Impl("torch F.linear_cross_entropy", case, _torch_lce("mean"), missing=_torch_lce_missing)]
    if case == "linear_logprobs_kl":
        impls.append(Impl("trl-1.16 chunked logprob+divergence", case, _trl_logprobs_kl, requires="trl"))
    if case == "dpo":
        impls.append(Impl("liger-kernel fused linear DPO", case, _liger_dpo, requires="liger_kernel"))
    return impls


def why_unavailable(impl: Impl, device: str) -> str | None:
    """Why ``impl`` cannot run on ``device`` here (``None`` when it can)."""
    if not impl.name.startswith("dpo_kernels["):
        return impl.unavailable(device)
    backend = impl.name[len("dpo_kernels["):-1]
    status = dpo_kernels.available_backends()[backend]
    if device not in impl.devices:
        return f"{impl.name} is listed for {impl.devices[0]}"
    if not status.available:
        return status.reason
    if backend == "triton" and device == "cpu":
        return "the Triton interpreter is a test vehicle, not a CPU implementation"
    return None
