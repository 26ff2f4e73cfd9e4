"""``python -m dpo_kernels.tools.gpu_check``: the one prepared command for a lent GPU, in two calls of the device tool.

On the device machine only what is written under ``$OUT`` comes back, and one command may run at most 600 s, so::

    # call 1 (about 1 min build + at most 6 min): build, policy, gradients, profile, numerics, compile, time
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python setup.py build_ext --inplace && \
        python -m dpo_kernels.tools.gpu_check --call 1 --out "$OUT"
    # call 2 (about 1 min build + at most 4 min): build, sanitizer, tests
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python setup.py build_ext --inplace && \
        python -m dpo_kernels.tools.gpu_check --call 2 --out "$OUT"

With the machine's start (a few minutes) that fits the 15 minutes of device time a session is lent. Each call writes
``gpu_check_call<N>.json`` and ``.md`` under ``--out`` after **every** section (a call stopped at its limit keeps what
it finished); without ``--call`` the files are ``gpu_check.json`` / ``.md``, by default under
``benchmarks/results/<gpu name>/``. Every section has its own time budget (:data:`BUDGET_S`) and the call its
deadline (``--deadline-s``, default the call's share): a section that would pass it is skipped and says so, a case
that fails records its error and the next one runs. Commit what comes back under ``benchmarks/results/<gpu name>/``.

- ``build``: ``_C`` has its CUDA kernels and Triton compiles (fails on a build without CUDA);
- ``policy``: the product policy and its probes per dtype, bf16 and fp32 master weights under autocast; it fails
  when half operands do not reach the tensor cores;
- ``gradients``: every GPU backend against the float64 reference oracle, values and gradients, small shapes (from
  logits, from hidden states with KL, bias, softcap, masks; the DPO loss by both schedules), and from logits with
  N x V > 2^31 (int64 indexing) against the torch backend;
- ``profile``: one warm Llama-3 log-probs fwd+bwd per GPU backend: the operand dtypes of every matrix product
  (fails on an fp32 x fp32 product), the GEMM kernels against the plan's count and their TFLOP/s (fails under
  150, below any tensor-core rate), host syncs inside the call (at most the labels' one host read);
- ``numerics``: full-shape log-probs against a chunked fp32 oracle, beside TRL's own error;
- ``compile``: ``torch.compile(fullgraph=True)`` of a DPO step against eager;
- ``time``: fused against naive and TRL 1.16's ``ChunkedLogProbFunction`` (where installed), interleaved, CUDA events,
  warm-up excluded, peak allocator bytes, at the Llama-3 and Gemma-2 heads, bf16 and fp32 master under autocast; and
  DPO / TDPO2 from hidden states at the Llama-3 head (then sigmoid DPO at the Gemma-2 head as time allows), each
  schedule, against naive and, for sigmoid DPO, TRL 1.16's kept-token DPO (``_trl_dpo``), each case in its own
  error capture, the eager cases with a budget that holds the batch in one group;
- ``sanitizer``: a small-shape sweep under ``compute-sanitizer``: memcheck with the caching allocator off
  (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), racecheck on this package's kernels only; each tool with its own timeout,
  its process group killed on a timeout, its output kept;
- ``tests``: ``pytest`` over the GPU tests (:data:`TESTS`).

Peers that are not installed are left out with the reason; ``--quick`` runs fewer cases. ``--dry-run`` needs no GPU:
it plans every case the real run would run (tile plans, expected GEMM counts, the eager cases' pair groups at the
budget they pass) and exits 1 when one would be refused; CI runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SECTIONS = ("build", "policy", "gradients", "profile", "numerics", "compile", "time", "sanitizer", "tests")
CALLS = {1: ("build", "policy", "gradients", "profile", "numerics", "compile", "time"),
         2: ("build", "sanitizer", "tests")}
DEADLINE_S = {1: 360, 2: 240, None: 540}  # each call's share of the 15 device minutes, build and start excluded
BUDGET_S = {"build": 30, "policy": 20, "gradients": 60, "profile": 45, "numerics": 20, "compile": 45, "time": 150,
            "sanitizer": 150, "tests": 120}  # what a section may take; it is skipped when less time is left
SANITIZER_TIMEOUT_S = {"memcheck": 90, "racecheck": 50}
TESTS = ("tests/ops/test_gpu_backends.py", "tests/ops/test_nonfinite_inputs.py")
MIN_TENSOR_CORE_TFLOPS = 150.0  # above an H100's fp32 SIMT peak (67), far below its bf16 tensor-core peak (989)


@dataclass(frozen=True)
class Head:
    name: str
    dim: int
    vocab: int


# Llama-3's head and Gemma-2 2B's, the heads of the issues' roofline model, so that a measurement sits beside its
# modelled figure
HEADS = (Head("llama3", 4096, 128256), Head("gemma2", 2304, 256000))
TOKENS = 8192
DPO_BATCH = (8, 1024, 256)  # rows (B pairs = rows / 2), tokens per row, masked prompt tokens per row
DPO_LOSSES = ("sigmoid", "tdpo2")
DPO_WEIGHTS = ("bf16", "fp32_master_autocast")
SCHEDULES = ("eager", "recompute", "auto")
_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.IGNORECASE)
_SYNC = re.compile(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!.*Async)")
_PACKAGE_KERNELS = r"(fold_tile|grad_tile|logits_forward|logits_backward)_kernel"


# --------------------------------------------------------------------------------------------- the plan (no GPU)


def plan_summary(head: Head, tokens: int, dtype: torch.dtype) -> dict:
    """Tile plans of a log-probs fwd+bwd at ``head`` on an accelerator, and the GEMMs they issue: one per forward
    tile, three per backward tile (the recomputed logits, ``dH``, ``dW``)."""
    from ..ops.linear import plan
    from ..options import TokenOptions

    device = torch.device("cuda")
    half = dtype in (torch.float16, torch.bfloat16)
    forward = plan.plan_tiles(tokens, head.vocab, 4, TokenOptions(), device, dim=head.dim)
    backward = plan.plan_tiles(tokens, head.vocab, 4 + (2 if half else 0), TokenOptions(), device, dim=head.dim)

    def tiles(p):
        return len(list(p.token_blocks(tokens))) * len(list(p.vocab_chunks(head.vocab)))

    chunks = [e - s for s, e in backward.vocab_chunks(head.vocab)]
    return {
        "head": asdict(head), "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
        "forward_tile": [forward.tokens, forward.vocab], "backward_tile": [backward.tokens, backward.vocab],
        "vocab_chunks": len(chunks), "chunk_widths": sorted(set(chunks)),
        "expected_gemms": {"forward": tiles(forward), "backward": 3 * tiles(backward)},
        "backward_scratch_mib": backward.tokens * backward.vocab * (6 if half else 4) / 2**20,
        "dh_traffic_gb": len(chunks) * 8 * tokens * head.dim / 1e9,
        "gemm_tflop": 8 * tokens * head.dim * head.vocab / 1e12,
    }


@dataclass(frozen=True)
class DpoCase:
    """One timed DPO case at the Llama-3 head over :data:`DPO_BATCH`."""

    loss_type: str
    weights: str  # "bf16" weights, or "fp32_master_autocast": fp32 weights and hidden states under bf16 autocast
    schedule: str

    @property
    def name(self) -> str:
        return f"{self.loss_type}/{self.weights}/{self.schedule}"

    def eager_need(self, head: Head):
        """What the eager schedule keeps for this case (:class:`~dpo_kernels.ops.linear.eager.EagerNeed`)."""
        from ..losses import objective
        from ..ops.linear.eager import EagerNeed
        from ..ops.linear.plan import kept_store_dtype
        from ..options import TokenOptions

        rows, seq, masked = DPO_BATCH
        converted = 0 if self.weights == "bf16" else 2 * head.vocab * head.dim * 2  # fp32 masters: both heads, bf16
        # bf16 GEMM operands in both setups on CUDA: the scaled store (2 bytes a logit)
        return EagerNeed([seq - masked] * rows, head.vocab, head.dim, torch.float32,
                         keep_ref_tiles=objective(self.loss_type).uses_token_kl,
                         half_weight_grad=self.weights == "bf16", converted_bytes=converted,
                         store_dtype=kept_store_dtype(torch.bfloat16, torch.float32, TokenOptions()),
                         grad_itemsize=2 if self.weights == "bf16" else 4, policy_converted_bytes=converted // 2)

    def budget_mb(self, head: Head) -> float | None:
        """``eager_budget_mb`` for the case: the whole batch in one group for ``schedule="eager"``, else the
        default."""
        return math.ceil(self.eager_need(head).one_group_bytes / 2**20) + 1 if self.schedule == "eager" else None


def dpo_cases(quick: bool = False) -> list[DpoCase]:
    weights = DPO_WEIGHTS[:1] if quick else DPO_WEIGHTS
    return [DpoCase(loss, w, s) for loss in DPO_LOSSES for w in weights for s in SCHEDULES]


def plan_dpo_case(case: DpoCase, head: Head = HEADS[0]) -> dict:
    """The pair groups the case's call will form at its budget, or why it would be refused (``refused``)."""
    need = case.eager_need(head)
    budget = need.budget_bytes(case.budget_mb(head), torch.device("cuda"))
    groups = need.groups(budget)
    row = {"case": case.name, "eager_budget_mb": budget / 2**20, "one_group_mib": need.one_group_bytes / 2**20}
    if case.schedule == "recompute":
        row["eager"] = "not run (schedule='recompute')"
    elif isinstance(groups, str):
        row["eager"] = f"not possible: {groups}"
        if case.schedule == "eager":
            row["refused"] = groups
    else:
        row["eager"] = f"{len(groups.bounds)} group(s) of pairs {list(groups.bounds)}" + (
            "" if groups.store_vocab is None else f", the store keeping {groups.store_vocab} of {need.vocab} columns")
    return row


def dry_run(quick: bool = False) -> dict:
    plans = [plan_summary(h, TOKENS, dt) for h in HEADS for dt in (torch.bfloat16, torch.float32)]
    rows, seq, masked = DPO_BATCH
    cases = [plan_dpo_case(c) for c in dpo_cases(quick)]
    return {"plans": plans, "dpo_batch": {"rows": rows, "seq": seq, "masked": masked,
                                         "kept_tokens": rows * (seq - masked)},
            "dpo_cases": cases, "refused": [c["case"] for c in cases if "refused" in c],
            "calls": {str(k): list(v) for k, v in CALLS.items()}, "budget_s": BUDGET_S}


# --------------------------------------------------------------------------------------------- helpers on a GPU


def _inputs(head: Head, tokens: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(1, tokens, head.dim, device="cuda", generator=g, dtype=dtype)
    weight = torch.randn(head.vocab, head.dim, device="cuda", generator=g, dtype=dtype) / head.dim**0.5
    labels = torch.randint(0, head.vocab, (1, tokens), device="cuda", generator=g)
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "labels": labels}


def _ours(x: dict, backend: str = "auto"):
    from .. import linear_token_logprobs

    return linear_token_logprobs(x["hidden"], x["weight"], x["labels"], backend=backend)


def _ours_recompute(x: dict):
    from .. import linear_token_logprobs

    return linear_token_logprobs(x["hidden"], x["weight"], x["labels"], schedule="recompute")


def _naive(x: dict):
    logits = (x["hidden"] @ x["weight"].T).float()
    return torch.log_softmax(logits, -1).gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)


def _trl(x: dict):
    from trl.kernels import ChunkedLogProbFunction

    h, w = x["hidden"].flatten(0, 1), x["weight"]
    return ChunkedLogProbFunction.apply(h, w, None, x["labels"].flatten(), 1.0, 32768, None, 1.0,
                                        ("log_probs",))[0].view(x["labels"].shape)


def _peer_missing(name: str) -> str | None:
    import importlib

    try:
        if name == "trl":
            _ = importlib.import_module("trl.kernels").ChunkedLogProbFunction
    except (ImportError, AttributeError) as exc:
        return f"not installed ({exc})"
    return None


def _fwd_bwd(fn, x: dict, autocast: bool) -> None:
    for t in (x["hidden"], x["weight"]):
        t.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x)
    out.float().sum().backward()


def _timed(step) -> tuple[float, float]:
    """``(ms, peak extra MiB)`` of one call of ``step`` (a fwd+bwd), CUDA events around it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**20


def _interleaved(steps: dict, rounds: int) -> tuple[dict, dict, dict]:
    """``steps``: name -> zero-argument fwd+bwd. One untimed warm-up each, then ``rounds`` rounds in alternating
    order; ``(median ms, peak extra MiB, errors)`` per name: a step whose warm-up or round raises is dropped with its
    error, the others still run."""
    errors = {}
    for name, step in steps.items():
        try:
            step()
        except Exception as exc:  # recorded; the other steps are still timed
            errors[name] = f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    live = [k for k in steps if k not in errors]
    times, peaks = {k: [] for k in live}, {k: 0.0 for k in live}
    for r in range(rounds):
        for name in (live if r % 2 == 0 else list(reversed(live))):
            if name in errors:
                continue
            try:
                ms, peak = _timed(steps[name])
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            times[name].append(ms)
            peaks[name] = max(peaks[name], peak)
    median = {k: statistics.median(v) for k, v in times.items() if k not in errors}
    return median, {k: v for k, v in peaks.items() if k in median}, errors


class _Clock:
    """The call's deadline: ``left()`` seconds remain."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _gpu_backends() -> list[str]:
    from ..ops.registry import available_backends

    return [b for b in ("cuda", "triton") if available_backends()[b].available]


def _run_bounded(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cmd`` in its own process group for at most ``timeout`` s; on a timeout the whole group is killed (no
    child left holding the GPU) and the output so far is kept."""
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        text = log.read()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start, "timed_out": timed_out,
            "timeout_s": timeout, "tail": text[-4000:]}


# --------------------------------------------------------------------------------------------- sections


def section_policy() -> dict:
    from ..ops.linear import products

    out = {}
    for dt in (torch.bfloat16, torch.float16):
        out[str(dt)] = {"half_into_float": products.half_into_float("cuda", dt),
                        "accumulates_into_float": products.accumulates_into_float("cuda", dt),
                        "batches_into_float": products.batches_into_float("cuda", dt)}
    h = torch.zeros(2, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compute = products.product_dtype(h, h)
    master = products.Products.in_dtype(compute, "cuda", torch.float32)
    out["fp32_master_under_bf16_autocast"] = {"compute": str(master.compute_dtype),
                                              "operands": str(master.operand_dtype)}
    out["ok"] = out[str(torch.bfloat16)]["half_into_float"] and master.operand_dtype == torch.bfloat16
    return out


def section_build() -> dict:
    """``_C`` with its CUDA kernels, and Triton: a build without CUDA fails here instead of skipping silently."""
    from ..ops.registry import available_backends

    status = available_backends()
    out = {name: {"available": st.available, "reason": st.reason} for name, st in status.items()}
    missing = [b for b in ("cuda", "triton") if not status[b].available]
    out["ok"] = not missing
    if missing:
        out["error"] = f"GPU backends unavailable on a GPU: {missing} (see their reasons; rebuild _C with nvcc)"
    return out


GRADIENT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _oracle_case(kind: str, backend: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> dict:
    """Relative errors (max |a - e| / max |e|) of one small case on ``backend`` against the reference oracle in
    float64 on the same rounded inputs, outputs and gradients under one random upstream each; ``masked_nonzero``
    counts outputs that are not exactly 0 at masked positions."""
    from .. import fused_dpo_loss, linear_token_logprobs_and_kl, token_logprobs_and_kl

    g = torch.Generator(device=device).manual_seed(seed)
    rows, seq, vocab, dim = 4, 13, 1003, 48
    labels = torch.randint(0, vocab, (rows, seq), device=device, generator=g)
    labels[:, :3] = -100
    labels[1, 9:] = -100
    x = {"logits": torch.randn(rows, seq, vocab, device=device, generator=g) * 3,
         "ref_logits": torch.randn(rows, seq, vocab, device=device, generator=g) * 3,
         "hidden": torch.randn(rows, seq, dim, device=device, generator=g),
         "weight": torch.randn(vocab, dim, device=device, generator=g) / dim**0.5,
         "bias": torch.randn(vocab, device=device, generator=g) * 0.1,
         "ref_hidden": torch.randn(rows, seq, dim, device=device, generator=g),
         "ref_weight": torch.randn(vocab, dim, device=device, generator=g) / dim**0.5}
    x = {k: v.to(dtype) for k, v in x.items()}
    opts = {"softcap": 30.0, "temperature": 0.8}

    def run(t, be):
        if kind == "logits":
            return token_logprobs_and_kl(t["logits"], t["ref_logits"], labels, backend=be, **opts), ("logits",)
        if kind in ("linear", "linear_frozen", "linear_eager"):
            # a frozen head: the hidden states' gradient formed in the forward; linear_eager: a trainable head's
            # tiles kept for the backward (the per-token eager schedule, forced; the oracle has no tiles)
            wrt = ("hidden",) if kind == "linear_frozen" else ("hidden", "weight", "bias")
            schedule = "eager" if kind == "linear_eager" and be != "reference" else "auto"
            return linear_token_logprobs_and_kl(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], labels,
                                                bias=t["bias"], backend=be, schedule=schedule, **opts), wrt
        schedule = kind.removeprefix("dpo_") if be != "reference" else "recompute"  # the oracle has no tiles
        out = fused_dpo_loss(labels=labels, policy_hidden=t["hidden"], lm_head_weight=t["weight"],
                             lm_head_bias=t["bias"], ref_hidden=t["ref_hidden"], ref_lm_head_weight=t["ref_weight"],
                             loss_type="tdpo2", schedule=schedule, backend=be, **opts)
        return (out.loss, out.chosen_logps, out.rejected_kl), ("hidden", "weight", "bias")

    results, upstream = {}, None
    for be, cast in (("reference", torch.float64), (backend, None)):
        frozen = kind == "linear_frozen"
        leaves = {k: (v.to(cast) if cast else v).detach().requires_grad_(not frozen or k == "hidden")
                  for k, v in x.items()}
        outs, wrt = run(leaves, be)
        if upstream is None:
            gu = torch.Generator(device=device).manual_seed(99)
            upstream = [torch.randn(o.shape, device=device, generator=gu, dtype=torch.float64) for o in outs]
        diff = [(o, u.to(o.dtype)) for o, u in zip(outs, upstream, strict=True) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], [leaves[k] for k in wrt], [u for _, u in diff])
        results[be] = (outs, dict(zip(wrt, grads, strict=True)))
    (ref_outs, ref_grads), (outs, grads) = results["reference"], results[backend]
    mask = labels != -100

    def rel(a, e):
        a, e = a.detach().double(), e.detach().double()
        if not torch.isfinite(a).all():
            return float("inf")
        return float((a - e).abs().max() / e.abs().max().clamp(min=1e-30)) if a.numel() else 0.0

    errors = {f"out{i}": rel(o, e) for i, (o, e) in enumerate(zip(outs, ref_outs, strict=True))}
    errors.update({f"d{k}": rel(grads[k], ref_grads[k]) for k in grads})
    masked = sum(int((o[~mask] != 0).sum()) for o in outs if o.shape == mask.shape)
    return {"errors": errors, "masked_nonzero": masked}


def section_gradients(quick: bool) -> dict:
    out = {}

    def record(name: str, run) -> None:  # each case in its own error capture
        try:
            out[name] = run()
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}

    def oracle(kind, backend, dtype) -> dict:
        row = _oracle_case(kind, backend, dtype)
        return {**row, "ok": row["masked_nonzero"] == 0 and max(row["errors"].values()) <= GRADIENT_RTOL[dtype]}

    def large(backend) -> dict:
        err = _large_from_logits(backend)
        return {"max_abs_error": err, "ok": err <= 5e-2}

    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for backend in _gpu_backends():
        for dtype in dtypes:
            for kind in ("logits", "linear", "linear_frozen", "linear_eager", "dpo_eager", "dpo_recompute"):
                record(f"{backend}/{str(dtype).removeprefix('torch.')}/{kind}",
                       lambda k=kind, b=backend, d=dtype: oracle(k, b, d))
        if not quick:  # from logits with N x V > 2^31: int64 indexing
            record(f"{backend}/bfloat16/from_logits_n_v_over_2_31", lambda b=backend: large(b))
            torch.cuda.empty_cache()
    failures = [name for name, row in out.items() if not row["ok"]]
    return {**out, "failures": failures, "ok": bool(out) and not failures}


def _large_from_logits(backend: str) -> float:
    """Max abs error of ``backend``'s from-logits log-probs at 16800 x 128256 bf16 logits (N x V > 2^31) against the
    torch backend's."""
    from .. import token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, 16800, 128256, device="cuda", generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 128256, (1, 16800), device="cuda", generator=g)
    ref = token_logprobs(logits, labels, backend="torch")
    return float((token_logprobs(logits, labels, backend=backend) - ref).abs().max())


class _ProductOperands:
    """Context manager recording the operand dtypes and sizes of every matrix product dispatched inside it."""

    ARGS = {"mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "baddbmm": (1, 2)}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in _ProductOperands.ARGS:
                    i, j = _ProductOperands.ARGS[name]
                    a, b = args[i], args[j]
                    seen.append({"op": name, "a": str(a.dtype), "b": str(b.dtype),
                                 "flop": 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]})
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def fp32_products(self, min_flop: int = 2**24) -> list[dict]:
        return [p for p in self.seen if p["a"] == p["b"] == "torch.float32" and p["flop"] >= min_flop]


def section_profile(quick: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    head, out = HEADS[0], {}
    expected = plan_summary(head, TOKENS, torch.bfloat16)["expected_gemms"]
    for backend in _gpu_backends():
        for weights in ("bf16",) if quick else DPO_WEIGHTS:
            autocast = weights != "bf16"
            x = _inputs(head, TOKENS, torch.float32 if autocast else torch.bfloat16)

            def step(x=x, backend=backend, autocast=autocast):
                _fwd_bwd(lambda v: _ours(v, backend), x, autocast)

            step()  # warm: compiles, allocator
            with _ProductOperands() as operands:
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gemms = [e for e in kernels if _GEMM.search(e.name)]
            # the call's one host read of its labels (dpo_kernels.host_read), and the synchronize closing the profile
            syncs = [e.name for e in prof.events() if _SYNC.search(e.name)][:-1]
            gemm_us = sum(e.device_time for e in gemms)
            tile_us = sum(e.device_time for e in kernels
                          if re.search(r"fold|grad", e.name) and not _GEMM.search(e.name))
            logits_bytes = TOKENS * head.vocab * 4 * 3  # fp32 tile written by the GEMM, read by fold and by grad
            tflops = 8 * TOKENS * head.dim * head.vocab / max(gemm_us, 1e-9) / 1e6
            fp32 = operands.fp32_products()
            out[f"{backend}/{weights}"] = {
                "gemm_kernels": len(gemms), "expected_gemms": expected["forward"] + expected["backward"],
                "gemm_kernel_names": sorted({e.name[:120] for e in gemms}),
                "product_operands": sorted({f"{p['op']} {p['a']} x {p['b']}" for p in operands.seen}),
                "fp32_products": len(fp32), "host_syncs": len(syncs), "expected_host_syncs": 1,
                "sync_names": sorted(set(syncs)), "gemm_tflops": tflops,
                "tile_kernel_tb_per_s": logits_bytes / max(tile_us, 1e-9) / 1e6,
                "ok": not fp32 and len(syncs) <= 1 and tflops >= MIN_TENSOR_CORE_TFLOPS,
            }
            del x, step
            torch.cuda.empty_cache()
    return out


def section_time(quick: bool, rounds: int, clock: _Clock) -> dict:
    impls = {"fused": _ours, "naive": _naive}
    missing = {}
    if (why := _peer_missing("trl")) is None:
        impls["trl_1_16"] = _trl
    else:
        missing["trl_1_16"] = why
    # (head, dtype, autocast, frozen head): bf16, fp32 masters under autocast, and a frozen bf16 head (LoRA: the
    # hidden states' gradient formed in the forward)
    cases = [(h, dt, ac, fz) for h in HEADS for dt, ac, fz in ((torch.bfloat16, False, False),
                                                              (torch.float32, True, False),
                                                              (torch.bfloat16, False, True))]
    logprobs = []
    for head, dtype, autocast, frozen in (cases[:3] if quick else cases):
        logprobs.append(_bounded_case(
            clock, 25, lambda h=head, d=dtype, a=autocast, f=frozen: _time_logprobs(h, d, a, impls, rounds, f),
            {"head": head.name, "dtype": str(dtype), "autocast": autocast, "frozen_head": frozen}))
    # the Llama-3 head's cases first, then sigmoid DPO at the Gemma-2 head (the issues' goals), as time allows
    dpo_runs = [(HEADS[0], c) for c in sorted({(k.loss_type, k.weights) for k in dpo_cases(quick)})]
    dpo_runs += [(HEADS[1], c) for c in sorted({(k.loss_type, k.weights) for k in dpo_cases(quick)})
                 if c[0] == "sigmoid"]
    dpo = [_bounded_case(clock, 20, lambda h=h, c=c: _time_dpo(c, rounds, h),
                         {"head": h.name, "case": c[0] + "/" + c[1]}) for h, c in dpo_runs]
    failed = [r for r in logprobs + dpo if "error" in r]
    return {"logprobs": logprobs, "dpo": dpo, "missing": missing, "ok": not failed}


def _bounded_case(clock: _Clock, needs_s: float, run, label: dict) -> dict:
    """One timed case in its own error capture, skipped when fewer than ``needs_s`` seconds are left."""
    if clock.left() < needs_s:
        return {**label, "skipped": f"{clock.left():.0f} s left before the call's deadline"}
    try:
        return {**label, **run()}
    except Exception as exc:
        return {**label, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.cuda.empty_cache()


def _time_logprobs(head: Head, dtype: torch.dtype, autocast: bool, impls: dict, rounds: int,
                   frozen: bool = False) -> dict:
    """``fused`` is the default (``schedule="auto"``: for a trainable bf16-operand head the per-token eager
    schedule where estimated faster); ``fused_recompute`` the recompute schedule beside it, for a trainable head."""
    x = _inputs(head, TOKENS, dtype)
    x["weight"].requires_grad_(not frozen)
    if not frozen:
        impls = {**impls, "fused_recompute": _ours_recompute}
    steps = {k: (lambda fn=fn: _fwd_bwd(fn, x, autocast)) for k, fn in impls.items()}
    median, peaks, errors = _interleaved(steps, rounds)
    row = {"tokens": TOKENS, "median_ms": median, "peak_mib": peaks, "errors": errors}
    for peer in ("trl_1_16", "naive", "fused_recompute"):
        if peer in median and "fused" in median:
            row[f"fused_over_{peer}"] = {"time": median["fused"] / median[peer],
                                        "peak": peaks["fused"] / max(peaks[peer], 1e-9)}
    if "fused" in errors:
        row["error"] = errors["fused"]
    return row


def _dpo_inputs(head: Head, weights: str, seed: int = 0) -> dict:
    rows, seq, masked = DPO_BATCH
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    g = torch.Generator(device="cuda").manual_seed(seed)
    labels = torch.randint(0, head.vocab, (rows, seq), device="cuda", generator=g)
    labels[:, :masked] = -100
    w = torch.randn(head.vocab, head.dim, device="cuda", generator=g, dtype=dtype) / head.dim**0.5
    return {"labels": labels, "lm_head_weight": w.requires_grad_(),
            "policy_hidden": torch.randn(rows, seq, head.dim, device="cuda", generator=g,
                                         dtype=dtype).requires_grad_(),
            "ref_hidden": torch.randn(rows, seq, head.dim, device="cuda", generator=g, dtype=dtype),
            "ref_lm_head_weight": w.detach().clone()}


def _trl_dpo(x: dict, beta: float = 0.1, patched: bool = False) -> torch.Tensor:
    """Sigmoid DPO as a TRL 1.16 user computes it from hidden states: ``ChunkedLogProbFunction`` over the kept
    tokens (gathered first), the policy with a gradient and the reference under ``no_grad``, summed per row (as the
    issues' model traces it); ``beta`` as ``fused_dpo_loss``'s default; ``patched``: the same with dpo_kernels'
    per-token log-probs in TRL's function's place, as ``patch()`` runs it (``schedule="auto"``). Any device."""
    import torch.nn.functional as F

    kept = x["labels"] != -100
    labels = x["labels"][kept]

    def sequence_logps(hidden, weight):
        if patched:
            from .. import linear_token_logprobs

            logps = linear_token_logprobs(hidden[kept], weight, labels)
        else:
            from trl.kernels import ChunkedLogProbFunction

            logps = ChunkedLogProbFunction.apply(hidden[kept], weight, None, labels, 1.0, 32768, None, 1.0,
                                                 ("log_probs",))[0]
        return torch.zeros(kept.shape, dtype=logps.dtype, device=logps.device).masked_scatter(kept, logps).sum(-1)

    policy = sequence_logps(x["policy_hidden"], x["lm_head_weight"])
    with torch.no_grad():
        ref = sequence_logps(x["ref_hidden"], x["ref_lm_head_weight"])
    ratios = policy - ref
    pairs = ratios.shape[0] // 2
    return -F.logsigmoid(beta * (ratios[:pairs] - ratios[pairs:])).mean()


def _naive_dpo(x: dict, loss_type: str):
    from .. import fused_dpo_loss

    logits = x["policy_hidden"] @ x["lm_head_weight"].T
    ref_logits = (x["ref_hidden"] @ x["ref_lm_head_weight"].T).detach()
    return fused_dpo_loss(labels=x["labels"], policy_logits=logits, ref_logits=ref_logits, loss_type=loss_type,
                          backend="reference").loss


class _ScheduleNotes(logging.Handler):
    """``fused_dpo_loss``'s debug lines (the schedule ``auto`` ran and why, both estimates, where a scaled store
    went), each once, under the name of the step that logged it (``current``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.current: str | None = None
        self.notes: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.current is not None and message.startswith("fused_dpo_loss:"):
            seen = self.notes.setdefault(self.current, [])
            if message not in seen:
                seen.append(message)


@contextlib.contextmanager
def _schedule_notes():
    """The ``dpo_kernels`` logger at debug level into a :class:`_ScheduleNotes` (not printed), restored after."""
    log, notes = logging.getLogger("dpo_kernels"), _ScheduleNotes()
    level, propagate = log.level, log.propagate
    log.addHandler(notes)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield notes
    finally:
        log.removeHandler(notes)
        log.setLevel(level)
        log.propagate = propagate


def _time_dpo(case: tuple[str, str], rounds: int, head: Head = HEADS[0]) -> dict:
    """Every schedule of ``case`` (loss type, weights) against naive and, for sigmoid DPO where TRL is installed,
    TRL 1.16's kept-token DPO (:func:`_trl_dpo`), interleaved; each schedule at the budget its :class:`DpoCase`
    states; ``notes``: what each schedule logged (the schedule ``auto`` ran, where the store went)."""
    from .. import fused_dpo_loss

    loss_type, weights = case
    x = _dpo_inputs(head, weights)
    autocast = weights != "bf16"
    losses = {}
    for schedule in SCHEDULES:
        budget = DpoCase(loss_type, weights, schedule).budget_mb(head)
        losses[f"fused_{schedule}"] = (lambda s=schedule, b=budget: fused_dpo_loss(
            **x, loss_type=loss_type, schedule=s, eager_budget_mb=b).loss)
    losses["naive"] = lambda: _naive_dpo(x, loss_type)
    if loss_type == "sigmoid":
        losses["patched"] = lambda: _trl_dpo(x, patched=True)  # TRL's DPO under patch(): the per-token schedule
        if _peer_missing("trl") is None:
            losses["trl_1_16"] = lambda: _trl_dpo(x)

    def step(name, loss):
        x["policy_hidden"].grad = x["lm_head_weight"].grad = None
        notes.current = name
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()

    with _schedule_notes() as notes:
        median, peaks, errors = _interleaved({k: (lambda k=k, loss=loss: step(k, loss)) for k, loss in losses.items()},
                                             rounds)
    row = {"median_ms": median, "peak_mib": peaks, "errors": errors, "notes": notes.notes}
    for k in median:
        for peer in ("naive", "trl_1_16"):
            if (k.startswith("fused_") or k == "patched") and peer in median:
                row[f"{k}_over_{peer}"] = {"time": median[k] / median[peer], "peak": peaks[k] / max(peaks[peer], 1)}
    if any(k.startswith("fused_") for k in errors):
        row["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items() if k.startswith("fused_"))
    return row


def section_numerics() -> dict:
    out = {}
    head = HEADS[0]
    x = _inputs(head, TOKENS, torch.bfloat16)
    with torch.no_grad():
        h, w, labels = x["hidden"][0].float(), x["weight"].float(), x["labels"][0]
        lse = torch.empty(TOKENS, device="cuda")
        for s in range(0, TOKENS, 1024):
            lse[s:s + 1024] = torch.logsumexp(h[s:s + 1024] @ w.T, -1)
        oracle = (h * w[labels]).sum(-1) - lse
        impls = {"fused": _ours, "naive": _naive}
        if _peer_missing("trl") is None:
            impls["trl_1_16"] = _trl
        for name, fn in impls.items():
            err = (fn(x)[0].float() - oracle).abs()
            out[name] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())}
    return out


def _sweep_child(device: str = "cuda", backends: tuple[str, ...] = ("cuda", "triton")) -> int:
    """The cases run under compute-sanitizer: each available backend of ``backends`` against the torch backend at
    small shapes, fwd + bwd (the oracle comparison is the ``gradients`` section's)."""
    from .. import linear_token_logprobs, linear_token_logprobs_and_kl
    from ..ops.registry import available_backends

    backends = [b for b in backends if available_backends()[b].available]
    g = torch.Generator(device=device).manual_seed(0)
    failures = 0
    for vocab, chunk in ((97, 32), (1000, 256), (32003, 4096)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for bias, softcap, kl in ((False, None, False), (True, 30.0, True)):
                h = torch.randn(3, 17, 64, device=device, generator=g, dtype=dtype)
                w = torch.randn(vocab, 64, device=device, generator=g, dtype=dtype) / 8
                b = torch.randn(vocab, device=device, generator=g, dtype=dtype) if bias else None
                labels = torch.randint(0, vocab, (3, 17), device=device, generator=g)
                labels[:, :5] = -100
                kwargs = dict(bias=b, softcap=softcap, vocab_chunk_size=chunk)
                for backend in ["torch"] + backends:  # fwd + bwd, value and gradients against the torch backend
                    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                    if kl:
                        logp, _, kl_out = linear_token_logprobs_and_kl(hh, ww, h.flip(0), w, labels, backend=backend,
                                                                       **kwargs)
                        out = torch.stack([logp, kl_out])
                    else:
                        out = linear_token_logprobs(hh, ww, labels, backend=backend, **kwargs)
                    out.float().sum().backward()
                    got = (out.float(), hh.grad.float(), ww.grad.float())
                    if backend == "torch":
                        ref = got
                        continue
                    if not all(torch.allclose(x, y, atol=5e-2, rtol=1e-2) for x, y in zip(got, ref, strict=True)):
                        failures += 1
                        print(f"mismatch: {backend} V={vocab} {dtype} bias={bias} softcap={softcap} kl={kl}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sweep: {failures} mismatches over backends {backends}")
    return 1 if failures else 0


def section_sanitizer(quick: bool, clock: _Clock) -> dict:
    """The sweep under memcheck (caching allocator off, so that a read past a tensor inside an allocator block is
    seen) and racecheck (this package's kernels only: torch's and cuBLAS's are not ours to check), each with its own
    timeout; a timeout kills the tool's process group and keeps its output."""
    from shutil import which

    if which("compute-sanitizer") is None:
        return {"skipped": "compute-sanitizer is not on PATH"}
    out = {}
    for tool in ("memcheck",) if quick else ("memcheck", "racecheck"):
        timeout = min(SANITIZER_TIMEOUT_S[tool], clock.left() - 5)
        if timeout < 20:
            out[tool] = {"skipped": f"{clock.left():.0f} s left before the call's deadline"}
            continue
        env = dict(os.environ)
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9"]
        if tool == "memcheck":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        else:
            cmd += ["--kernel-regex", f"kns={_PACKAGE_KERNELS}"]
        cmd += [sys.executable, "-m", "dpo_kernels.tools.gpu_check", "--sweep-child"]
        run = _run_bounded(cmd, timeout, env=env)
        run["ok"] = run["returncode"] == 0 and not run["timed_out"]
        out[tool] = run
    return out


def section_tests(clock: _Clock) -> dict:
    """The GPU tests, by pytest in a subprocess (its own process group, killed on the section's timeout)."""
    root = Path(__file__).resolve().parents[2]
    files = [f for f in TESTS if (root / f).exists()]
    if not files:
        return {"skipped": f"no tests under {root} (an installed package, not a checkout)"}
    timeout = min(BUDGET_S["tests"], clock.left() - 5)
    run = _run_bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files], timeout,
                       cwd=str(root))
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", run["tail"])
    run["counts"] = {k: int(v) for v, k in counts}
    run["ok"] = run["returncode"] == 0 and not run["timed_out"]
    return run


def section_compile() -> dict:
    from .. import fused_dpo_loss

    head = Head("small", 256, 4096)
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, head.vocab, (4, 64), device="cuda", generator=g)
    labels[:, :16] = -100
    w = (torch.randn(head.vocab, head.dim, device="cuda", generator=g) / 16).requires_grad_()
    h = torch.randn(4, 64, head.dim, device="cuda", generator=g).requires_grad_()
    rh, rw = torch.randn_like(h), w.detach().clone()

    def step(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w, ref_hidden=rh,
                                  ref_lm_head_weight=rw).loss

    eager_loss = step(h, w)
    eager_grads = torch.autograd.grad(eager_loss, (h, w))
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(h, w)
    grads = torch.autograd.grad(loss, (h, w))
    diffs = [float((a - b).abs().max()) for a, b in zip(grads, eager_grads, strict=True)]
    return {"loss_diff": float((loss - eager_loss).abs()), "grad_max_abs_diff": diffs,
            "ok": bool(torch.allclose(loss, eager_loss, atol=1e-4) and max(diffs) < 1e-3)}


# --------------------------------------------------------------------------------------------- report


def _markdown(record: dict) -> str:
    lines = [f"# gpu_check on {record['device']}", "", f"torch {record['torch']}, {record['when']}", ""]
    for name, body in record["sections"].items():
        lines += [f"## {name}", "", "```json", json.dumps(body, indent=1, default=str)[:8000], "```", ""]
    return "\n".join(lines)


def _default_out(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results" / slug


def _write(out: Path, stem: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(_markdown(record))


def _section_failed(result: dict) -> bool:
    return result.get("ok") is False or any(isinstance(v, dict) and v.get("ok") is False for v in result.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: plan every case (tile plans, GEMM counts, eager groups); exit 1 on a refusal")
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--call", type=int, choices=sorted(CALLS), default=None,
                        help="the sections of device call N (see above) and its deadline")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds this call may take; sections that would pass it are skipped")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help='folder for the results; on the device machine --out "$OUT" (only $OUT comes back)')
    parser.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_child:
        return _sweep_child()
    if args.sections is not None and args.call is not None:
        parser.error("--sections and --call: give one")
    chosen = args.sections or ",".join(SECTIONS)
    sections = list(CALLS[args.call]) if args.call else [s for s in chosen.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; expected a subset of {SECTIONS}")
    stem = "gpu_check" if args.call is None else f"gpu_check_call{args.call}"
    if args.dry_run:
        record = dry_run(args.quick)
        for p in record["plans"]:
            print(f"{p['head']['name']:<7} {p['dtype']:<9} N={p['tokens']}: backward tile {p['backward_tile']}, "
                  f"{p['vocab_chunks']} chunks of {p['chunk_widths']}, {p['backward_scratch_mib']:.0f} MiB scratch, "
                  f"dH traffic {p['dh_traffic_gb']:.1f} GB, GEMMs {p['expected_gemms']}")
        for c in record["dpo_cases"]:
            print(f"dpo {c['case']:<36} eager_budget_mb {c['eager_budget_mb']:8.0f}: {c['eager']}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}_dry_run.json").write_text(json.dumps(record, indent=2) + "\n")
        if record["refused"]:
            print(f"gpu_check: the real run would refuse {record['refused']}", file=sys.stderr)
            return 1
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU, or pass --dry-run", file=sys.stderr)
        return 2
    clock = _Clock(args.deadline_s if args.deadline_s is not None else DEADLINE_S[args.call])
    device = torch.cuda.get_device_name(0)
    out = args.out or _default_out(device)
    record = {"device": device, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "call": args.call, "plan": dry_run(args.quick), "sections": {}}
    rounds = 3 if args.quick else args.rounds
    runners = {"build": section_build, "policy": section_policy, "gradients": lambda: section_gradients(args.quick),
               "profile": lambda: section_profile(args.quick), "numerics": section_numerics,
               "compile": section_compile, "time": lambda: section_time(args.quick, rounds, clock),
               "sanitizer": lambda: section_sanitizer(args.quick, clock), "tests": lambda: section_tests(clock)}
    failed = False
    for name in sections:
        start = time.perf_counter()
        if clock.left() < BUDGET_S[name] and name not in ("time", "sanitizer", "tests"):  # those bound themselves
            result = {"skipped": f"{clock.left():.0f} s left before the call's deadline, {BUDGET_S[name]} s needed"}
        else:
            try:
                result = runners[name]()
            except Exception as exc:  # a failing section is recorded and the next one still runs
                result = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
        result["seconds"] = time.perf_counter() - start
        record["sections"][name] = result
        failed |= _section_failed(result)
        print(f"{name}: {json.dumps(result, default=str)[:2000]}", flush=True)
        _write(out, stem, record)  # after every section: a call stopped at its limit keeps what it finished
        torch.cuda.empty_cache()
    print(f"wrote {out / (stem + '.json')} and {stem}.md")
    if record["sections"].get("policy", {}).get("ok") is False:
        print("gpu_check: half operands do not reach the tensor cores (see policy)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
