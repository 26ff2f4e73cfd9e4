"""Mixed precision as trainers run it: every backend x hidden dtype x head dtype x autocast.

The rule (``dpo_kernels/ops/linear/products.py``, MATH.md §6): under autocast the head product is defined in
the autocast dtype, as ``nn.Linear`` computes it; without autocast in ``torch.promote_types(hidden, weight)``.
The expected values are the float64 oracle on the operands rounded to that dtype; gradients come back in each input's
own dtype.

The fused backends compute the products of the rounded operands in fp32 and never round a product, so their values
must be as close to the float64 oracle as fp32 arithmetic allows; their gradients within the rounding of the dtype
they are returned in (on CUDA also of ``dZ``, which the GEMMs take in the half compute dtype). The ``reference``
backend is the naive head (``nn.Linear`` under the same autocast: the logits themselves rounded to the product
dtype), so its values are held to that dtype's tolerance. The grid runs on the CPU (Triton through its interpreter)
and, where a GPU is present, on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dpo_kernels import fused_dpo_loss, linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs_and_kl
from dpo_kernels.ops.linear.products import product_dtype

from dpo_kernels.ops import backends_for

from .conftest import RTOL, assert_close, backends_under_test

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"off": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}
DEVICE_BACKENDS = [("cpu", b) for b in ("reference", *backends_under_test())]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", b) for b in ("reference", *backends_for("cuda")) if b != "torch"]


def _autocast(dtype: torch.dtype | None, device: str = "cpu"):
    return torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)


def _inputs(h_dtype, w_dtype, seed=0, rows=4, seq=6, d=24, v=257, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (rows, seq), generator=g)
    labels[:, :2] = -100
    x = {
        "labels": labels,
        "hidden": torch.randn(rows, seq, d, generator=g).to(h_dtype),
        "weight": (torch.randn(v, d, generator=g) / d**0.5).to(w_dtype),
        "bias": (torch.randn(v, generator=g) * 0.1).to(w_dtype),
        "ref_hidden": torch.randn(rows, seq, d, generator=g).to(h_dtype),
        "ref_weight": (torch.randn(v, d, generator=g) / d**0.5).to(torch.bfloat16),  # a bf16 reference model
    }
    return {k: t.to(device) for k, t in x.items()}


def _expected(x, compute: torch.dtype, ref_compute: torch.dtype, with_kl: bool):
    """The float64 oracle on the operands rounded to ``compute`` (the reference head's to ``ref_compute``)."""
    leaves = {k: x[k].to(compute).double().detach().requires_grad_() for k in ("hidden", "weight", "bias")}
    if with_kl:
        outs = linear_token_logprobs_and_kl(
            leaves["hidden"], leaves["weight"], x["ref_hidden"].to(ref_compute).double(),
            x["ref_weight"].to(ref_compute).double(), x["labels"], bias=leaves["bias"], backend="reference")
    else:
        outs = (linear_token_logprobs(leaves["hidden"], leaves["weight"], x["labels"], bias=leaves["bias"],
                                      backend="reference"),)
    return outs, leaves


def _run(x, backend, amp, with_kl):
    leaves = {k: x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    with _autocast(amp, x["hidden"].device.type):
        if with_kl:
            outs = linear_token_logprobs_and_kl(leaves["hidden"], leaves["weight"], x["ref_hidden"], x["ref_weight"],
                                                x["labels"], bias=leaves["bias"], backend=backend)
        else:
            outs = (linear_token_logprobs(leaves["hidden"], leaves["weight"], x["labels"], bias=leaves["bias"],
                                          backend=backend),)
    return outs, leaves


def _upstream(outs):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]


GRID = list(itertools.product(DTYPES, DTYPES, AUTOCAST))


@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("h_name, w_name, amp_name", GRID, ids=["-".join(c) for c in GRID])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])
def test_linear_path_under_every_precision(device, backend, h_name, w_name, amp_name, with_kl):
    h_dtype, w_dtype, amp = DTYPES[h_name], DTYPES[w_name], AUTOCAST[amp_name]
    x = _inputs(h_dtype, w_dtype, device=device)
    with _autocast(amp, device):
        compute = product_dtype(x["hidden"], x["weight"])
        ref_compute = product_dtype(x["ref_hidden"], x["ref_weight"])
    assert compute == (amp if amp is not None else torch.promote_types(h_dtype, w_dtype))
    outs, leaves = _run(x, backend, amp, with_kl)
    expected, exp_leaves = _expected(x, compute, ref_compute, with_kl)
    naive = backend == "reference"
    value_tol = max(RTOL[compute], RTOL[ref_compute] if with_kl else 0) if naive else RTOL[torch.float32]
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert o.dtype == torch.float32, "statistics are fp32"
        err = (o.double() - e.detach()).abs().max().item() / e.detach().abs().max().item()
        assert err <= value_tol, f"output {i}: {err:.2e} > {value_tol:.0e}"
    differentiable = [i for i, o in enumerate(outs) if o.requires_grad]
    upstream = _upstream(outs)
    torch.autograd.backward([outs[i] for i in differentiable], [upstream[i].to(outs[i].dtype) for i in differentiable])
    torch.autograd.backward([expected[i] for i in differentiable], [upstream[i] for i in differentiable])
    for name in ("hidden", "weight", "bias"):
        grad = leaves[name].grad
        assert grad.dtype == x[name].dtype, f"d{name} must come back in {x[name].dtype}, got {grad.dtype}"
        # the gradient's own rounding; the naive heads' rounded logits on top; on CUDA the half dZ of the GEMMs
        rounded = (compute, ref_compute) if with_kl else (compute,)
        if naive:
            tol_dtype = max((grad.dtype, *rounded), key=RTOL.get)
        else:
            tol_dtype = max((grad.dtype, compute) if device == "cuda" else (grad.dtype,), key=RTOL.get)
        assert_close(grad.float(), exp_leaves[name].grad, tol_dtype, f"d{name}")


@pytest.mark.parametrize("amp_name", ["off", "amp_bf16"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_fused_dpo_loss_with_fp32_master_weights_under_autocast(backend, loss_type, amp_name):
    """What a trainer hands the loss: fp32 hidden states (an fp32 backbone) or bf16 ones, an fp32 head, a bf16
    reference model; against the same call on the reference backend (nn.Linear semantics) within bf16 rounding."""
    amp = AUTOCAST[amp_name]
    x = _inputs(torch.float32, torch.float32)
    results = {}
    for be in ("reference", backend):
        h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
        with _autocast(amp):
            out = fused_dpo_loss(labels=x["labels"], policy_hidden=h, lm_head_weight=w, ref_hidden=x["ref_hidden"],
                                 ref_lm_head_weight=x["ref_weight"], loss_type=loss_type, backend=be)
        out.loss.backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        results[be] = (out.loss.detach(), h.grad, w.grad)
    dtype = torch.bfloat16 if amp is not None else torch.float32
    for a, e, what in zip(results[backend], results["reference"], ("loss", "dH", "dW"), strict=True):
        assert_close(a, e, dtype, what)


LOGITS_GRID = [(p, r) for p in DTYPES for r in DTYPES if p != r]


@pytest.mark.parametrize("p_name, r_name", LOGITS_GRID, ids=["-".join(c) for c in LOGITS_GRID])
@pytest.mark.parametrize("backend", backends_under_test())
def test_reference_logits_in_another_dtype(backend, p_name, r_name):
    """From logits, the reference may come from a model in another dtype: each row is read in its own dtype."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 301, (3, 5), generator=g)
    labels[0, :2] = -100
    logits = (torch.randn(3, 5, 301, generator=g) * 3).to(DTYPES[p_name])
    ref_logits = (torch.randn(3, 5, 301, generator=g) * 3).to(DTYPES[r_name])
    results = {}
    for be in ("reference", backend):
        leaf = logits.clone().requires_grad_()
        logp, ref_logp, kl = token_logprobs_and_kl(leaf, ref_logits, labels, backend=be)
        (logp.sum() + 0.5 * kl.sum()).backward()
        results[be] = (logp, ref_logp, kl, leaf.grad)
    for a, e, what in zip(results[backend], results["reference"], ("logp", "ref_logp", "kl", "grad"), strict=True):
        assert a.dtype == e.dtype, f"{what}: {a.dtype} != {e.dtype}"
        assert_close(a, e, a.dtype if what == "grad" else torch.float32, what)
