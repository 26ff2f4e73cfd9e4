"""CPU time of the per-token log-prob primitives, forward + backward, per implementation (pytest-benchmark).

    pytest benchmarks/test_cpu_backend.py --benchmark-only --benchmark-json=benchmarks/out/cpu/cpu_backend.json
    python benchmarks/cpu_ratios.py benchmarks/out/cpu/cpu_backend.json

Shapes are the C++ backend issue's: from logits N=4096 tokens, V=32000; from hidden states N=4096, D=512,
V=32000; fp32. ``naive`` is log_softmax + gather + autograd (the stock path). The logits are a fresh non-leaf tensor
each round (made outside the timed region), as an LM head's output would be.
"""

from __future__ import annotations

import pytest
import torch

import dpo_kernels
from dpo_kernels.ops import backends_for

N, V, D = 4096, 32000, 512
# the Triton interpreter (listed for CPU under TRITON_INTERPRET=1) is a test vehicle, not a CPU implementation
FUSED = [name for name in backends_for("cpu") if name != "triton"]


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def logits_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, V, generator=g) * 3).requires_grad_(), torch.randint(0, V, (N,), generator=g)


@pytest.fixture(scope="module")
def head_inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("impl", ["naive", *FUSED, *(f"{b}+inplace" for b in FUSED)])
def test_token_logprobs_forward_backward(benchmark, logits_inputs, impl):
    leaf, labels = logits_inputs
    benchmark.group = f"token_logprobs fwd+bwd N={N} V={V} fp32"

    def setup():
        leaf.grad = None
        return (leaf.clone(),), {}

    def run(logits):
        if impl == "naive":
            logp = _naive(logits, labels)
        else:
            backend, _, inplace = impl.partition("+")
            logp = dpo_kernels.token_logprobs(logits, labels, backend=backend, inplace_backward=bool(inplace))
        logp.sum().backward()

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["naive", *FUSED])
def test_linear_token_logprobs_forward_backward(benchmark, head_inputs, impl):
    hidden, weight, labels = head_inputs
    benchmark.group = f"linear_token_logprobs fwd+bwd N={N} D={D} V={V} fp32"

    def run():
        hidden.grad = weight.grad = None
        if impl == "naive":
            logp = _naive(hidden @ weight.T, labels)
        else:
            logp = dpo_kernels.linear_token_logprobs(hidden, weight, labels, backend=impl)
        logp.sum().backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
