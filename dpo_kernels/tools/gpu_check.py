"""``python -m dpo_kernels.tools.gpu_check``: one prepared command for a lent GPU, about ten minutes.

It writes ``gpu_check.json`` and ``gpu_check.md`` under ``benchmarks/results/<gpu name>/`` (``--out`` to change):

- ``policy``: the product policy and its probes per dtype, bf16 and fp32 master weights under autocast; it fails
  (exit 1) when half operands do not reach the tensor cores;
- ``profile``: a profiler pass over one warm Llama-3 log-probs fwd+bwd per GPU backend: the GEMM kernels (no
  ``sgemm``/fp32 GEMM), their count against the plan's, host syncs inside the call (at most the labels' one host read),
  TFLOP/s of the GEMMs and the bandwidth of the tile kernels;
- ``time``: fused against naive and TRL 1.16's ``ChunkedLogProbFunction`` (where installed), interleaved, CUDA events,
  warm-up excluded, peak allocator bytes, at the Llama-3 and Gemma-2 heads, bf16 and fp32 master under autocast; and
  sigmoid DPO / TDPO2 from hidden states (both schedules) against naive;
- ``numerics``: full-shape log-probs against a chunked fp32 oracle, beside TRL's own error;
- ``sanitizer``: a small-shape sweep under ``compute-sanitizer`` (memcheck, racecheck): odd vocabularies and chunk
  widths, masks, bias, softcap, KL, fp16/bf16/fp32, and one from-logits case with N x V > 2^31;
- ``compile``: ``torch.compile(fullgraph=True)`` of a DPO step against eager.

Peers that are not installed are left out with the reason; ``--quick`` runs fewer cases. ``--dry-run`` needs no GPU:
it prints and writes the shapes, the tile plans and the expected GEMM counts (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SECTIONS = ("policy", "profile", "time", "numerics", "sanitizer", "compile")


@dataclass(frozen=True)
class Head:
    name: str
    dim: int
    vocab: int


HEADS = (Head("llama3", 4096, 128256), Head("gemma2", 3584, 256000))
TOKENS = 8192
DPO_BATCH = (8, 1024, 256)  # rows (B pairs = rows / 2), tokens per row, masked prompt tokens per row
_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.IGNORECASE)
_FP32_GEMM = re.compile(r"sgemm|gemm_f32f32|f32f32_f32|_s\d+gemm", re.IGNORECASE)
_SYNC = re.compile(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!.*Async)")


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


def dry_run() -> dict:
    plans = [plan_summary(h, TOKENS, dt) for h in HEADS for dt in (torch.bfloat16, torch.float32)]
    rows, seq, masked = DPO_BATCH
    return {"plans": plans, "dpo_batch": {"rows": rows, "seq": seq, "masked": masked,
                                         "kept_tokens": rows * (seq - masked)},
            "sections": list(SECTIONS)}


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
            importlib.import_module("trl.kernels").ChunkedLogProbFunction
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


def _interleaved(steps: dict, rounds: int) -> tuple[dict, dict]:
    """``steps``: name -> zero-argument fwd+bwd. One untimed warm-up each, then ``rounds`` rounds in alternating
    order; ``(median ms, peak extra MiB)`` per name."""
    for step in steps.values():
        step()
    times, peaks = {k: [] for k in steps}, {k: 0.0 for k in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            ms, peak = _timed(steps[name])
            times[name].append(ms)
            peaks[name] = max(peaks[name], peak)
    return {k: statistics.median(v) for k, v in times.items()}, peaks


# --------------------------------------------------------------------------------------------- sections


def section_policy() -> dict:
    from ..ops.linear import products

    out = {}
    for dt in (torch.bfloat16, torch.float16):
        out[str(dt)] = {"half_into_float": products.half_into_float("cuda", dt),
                        "accumulates_into_float": products.accumulates_into_float("cuda", dt)}
    h = torch.zeros(2, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compute = products.product_dtype(h, h)
    master = products.Products.in_dtype(compute, "cuda", torch.float32)
    out["fp32_master_under_bf16_autocast"] = {"compute": str(master.compute_dtype),
                                              "operands": str(master.operand_dtype)}
    out["ok"] = out[str(torch.bfloat16)]["half_into_float"] and master.operand_dtype == torch.bfloat16
    return out


def section_profile(quick: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from ..ops.registry import available_backends

    head, out = HEADS[0], {}
    expected = plan_summary(head, TOKENS, torch.bfloat16)["expected_gemms"]
    for backend in ("cuda", "triton"):
        status = available_backends()[backend]
        if not status.available:
            out[backend] = {"skipped": status.reason}
            continue
        x = _inputs(head, TOKENS, torch.bfloat16)
        _fwd_bwd(lambda v: _ours(v, backend), x, False)  # warm: compiles, allocator
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _fwd_bwd(lambda v: _ours(v, backend), x, False)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gemms = [e for e in kernels if _GEMM.search(e.name)]
        fp32 = sorted({e.name for e in gemms if _FP32_GEMM.search(e.name)})
        # the call's one host read of its labels (dpo_kernels.host_read), and the synchronize closing the profile
        syncs = [e.name for e in prof.events() if _SYNC.search(e.name)][:-1]
        gemm_us = sum(e.device_time for e in gemms)
        tile_us = sum(e.device_time for e in kernels if re.search(r"fold|grad", e.name) and not _GEMM.search(e.name))
        logits_bytes = TOKENS * head.vocab * 4 * 3  # fp32 tile written by the GEMM, read by fold and by grad
        out[backend] = {
            "gemm_kernels": len(gemms), "expected_gemms": expected["forward"] + expected["backward"],
            "fp32_gemm_kernels": fp32, "host_syncs": len(syncs), "expected_host_syncs": 1,
            "sync_names": sorted(set(syncs)),
            "gemm_tflops": 8 * TOKENS * head.dim * head.vocab / max(gemm_us, 1e-9) / 1e6,
            "tile_kernel_tb_per_s": logits_bytes / max(tile_us, 1e-9) / 1e6,
            "ok": not fp32 and len(syncs) <= 1,
        }
        del x
        if quick:
            break
    return out


def section_time(quick: bool, rounds: int) -> dict:
    impls = {"fused": _ours, "naive": _naive}
    missing = {}
    if (why := _peer_missing("trl")) is None:
        impls["trl_1_16"] = _trl
    else:
        missing["trl_1_16"] = why
    cases = [(h, dt, ac) for h in HEADS for dt, ac in ((torch.bfloat16, False), (torch.float32, True))]
    results = [_time_logprobs(head, dtype, autocast, impls, rounds)
               for head, dtype, autocast in (cases[:2] if quick else cases)]
    return {"logprobs": results, "dpo": _time_dpo(rounds), "missing": missing}


def _time_logprobs(head: Head, dtype: torch.dtype, autocast: bool, impls: dict, rounds: int) -> dict:
    x = _inputs(head, TOKENS, dtype)
    median, peaks = _interleaved({k: (lambda fn=fn: _fwd_bwd(fn, x, autocast)) for k, fn in impls.items()}, rounds)
    row = {"head": head.name, "dtype": str(dtype), "autocast": autocast, "tokens": TOKENS,
           "median_ms": median, "peak_mib": peaks}
    for peer in ("trl_1_16", "naive"):
        if peer in median:
            row[f"fused_over_{peer}"] = {"time": median["fused"] / median[peer],
                                        "peak": peaks["fused"] / max(peaks[peer], 1e-9)}
    return row


def _dpo_inputs(head: Head, seed: int = 0) -> dict:
    rows, seq, masked = DPO_BATCH
    g = torch.Generator(device="cuda").manual_seed(seed)
    labels = torch.randint(0, head.vocab, (rows, seq), device="cuda", generator=g)
    labels[:, :masked] = -100
    w = torch.randn(head.vocab, head.dim, device="cuda", generator=g, dtype=torch.bfloat16) / head.dim**0.5
    return {"labels": labels, "lm_head_weight": w.requires_grad_(),
            "policy_hidden": torch.randn(rows, seq, head.dim, device="cuda", generator=g,
                                         dtype=torch.bfloat16).requires_grad_(),
            "ref_hidden": torch.randn(rows, seq, head.dim, device="cuda", generator=g, dtype=torch.bfloat16),
            "ref_lm_head_weight": w.detach().clone()}


def _naive_dpo(x: dict, loss_type: str):
    from .. import fused_dpo_loss

    logits = x["policy_hidden"] @ x["lm_head_weight"].T
    ref_logits = (x["ref_hidden"] @ x["ref_lm_head_weight"].T).detach()
    return fused_dpo_loss(labels=x["labels"], policy_logits=logits, ref_logits=ref_logits, loss_type=loss_type,
                          backend="reference").loss


def _time_dpo(rounds: int) -> list[dict]:
    from .. import fused_dpo_loss

    x = _dpo_inputs(HEADS[0])
    out = []
    for loss_type in ("sigmoid", "tdpo2"):
        losses = {f"fused_{s}": (lambda s=s: fused_dpo_loss(**x, loss_type=loss_type, schedule=s).loss)
                  for s in ("eager", "recompute")}
        losses["naive"] = lambda: _naive_dpo(x, loss_type)

        def step(loss):
            x["policy_hidden"].grad = x["lm_head_weight"].grad = None
            loss().backward()

        median, peaks = _interleaved({k: (lambda loss=loss: step(loss)) for k, loss in losses.items()}, rounds)
        out.append({"loss_type": loss_type, "median_ms": median, "peak_mib": peaks,
                    "eager_over_naive": median["fused_eager"] / median["naive"]})
    return out


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


def _sweep_child(device: str = "cuda", backends: tuple[str, ...] = ("cuda", "triton"), large: bool = True) -> int:
    """The cases run under compute-sanitizer: each available backend of ``backends`` against the torch backend at
    small shapes, fwd + bwd; ``large``: also the from-logits case with N x V > 2^31."""
    from .. import linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs
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
    if backends and large:  # one from-logits case with N x V > 2^31 (int64 indexing)
        logits = torch.randn(1, 16800, 128256, device="cuda", generator=g, dtype=torch.bfloat16)
        labels = torch.randint(0, 128256, (1, 16800), device="cuda", generator=g)
        ref = token_logprobs(logits, labels, backend="torch")
        for backend in backends:
            if not torch.allclose(token_logprobs(logits, labels, backend=backend), ref, atol=5e-2, rtol=1e-2):
                failures += 1
                print(f"mismatch: {backend} from logits, N x V = {16800 * 128256}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sweep: {failures} mismatches over backends {backends}")
    return 1 if failures else 0


def section_sanitizer(quick: bool) -> dict:
    from shutil import which

    if which("compute-sanitizer") is None:
        return {"skipped": "compute-sanitizer is not on PATH"}
    out = {}
    for tool in ("memcheck",) if quick else ("memcheck", "racecheck"):
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", sys.executable, "-m",
               "dpo_kernels.tools.gpu_check", "--sweep-child"]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        out[tool] = {"returncode": run.returncode, "seconds": time.perf_counter() - start,
                     "tail": (run.stdout + run.stderr)[-3000:], "ok": run.returncode == 0}
    return out


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
        lines += [f"## {name}", "", "```json", json.dumps(body, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def _default_out(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results" / slug


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: shapes, tile plans, expected GEMM counts")
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_child:
        return _sweep_child()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; expected a subset of {SECTIONS}")
    if args.dry_run:
        record = dry_run()
        for p in record["plans"]:
            print(f"{p['head']['name']:<7} {p['dtype']:<9} N={p['tokens']}: backward tile {p['backward_tile']}, "
                  f"{p['vocab_chunks']} chunks of {p['chunk_widths']}, {p['backward_scratch_mib']:.0f} MiB scratch, "
                  f"dH traffic {p['dh_traffic_gb']:.1f} GB, GEMMs {p['expected_gemms']}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check_dry_run.json").write_text(json.dumps(record, indent=2) + "\n")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    record = {"device": device, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "plan": dry_run(), "sections": {}}
    rounds = 3 if args.quick else args.rounds
    runners = {"policy": section_policy, "profile": lambda: section_profile(args.quick),
               "time": lambda: section_time(args.quick, rounds), "numerics": section_numerics,
               "sanitizer": lambda: section_sanitizer(args.quick), "compile": section_compile}
    failed = False
    for name in sections:
        start = time.perf_counter()
        try:
            result = runners[name]()
        except Exception as exc:  # a failing section is recorded and the next one still runs
            result = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
        result["seconds"] = time.perf_counter() - start
        record["sections"][name] = result
        failed |= result.get("ok") is False or any(isinstance(v, dict) and v.get("ok") is False
                                                   for v in result.values())
        print(f"{name}: {json.dumps(result, default=str)[:2000]}", flush=True)
        torch.cuda.empty_cache()
    out = args.out or _default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(_markdown(record))
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md")
    if record["sections"].get("policy", {}).get("ok") is False:
        print("gpu_check: half operands do not reach the tensor cores (see policy)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
