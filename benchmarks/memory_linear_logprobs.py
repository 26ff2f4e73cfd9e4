"""Peak extra CPU memory of per-token log-probs from hidden states, forward + backward: fused vs naive.

Each implementation runs in its own subprocess. The child allocates the inputs, runs one small warm-up, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), records its RSS as the baseline, runs forward + backward once,
and reports ``VmHWM - baseline``: the extra peak resident memory of the computation, measured, not computed.

    python benchmarks/memory_linear_logprobs.py                 # N=4096, D=512, V=32000, fp32
    python benchmarks/memory_linear_logprobs.py --check 0.15    # exit 1 if torch/naive exceeds 15%

Implementations: ``naive`` (matmul, fp32 log_softmax, gather, autograd), and ``torch`` / ``reference`` /
any other registered backend through ``dpo_kernels.linear_token_logprobs``.
Results go to ``benchmarks/results/<device>/memory_linear_logprobs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _child(impl: str, n: int, d: int, v: int, dtype_name: str) -> dict:
    import torch

    import dpo_kernels

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)

    def run(h, w, y):
        if impl == "naive":
            logits = h @ w.T
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        else:
            logp = dpo_kernels.linear_token_logprobs(h, w, y, backend=impl)
        logp.sum().backward()
        return logp.detach()

    # Warm-up on a small slice: loads lazily initialised code (BLAS, autograd) outside the measurement.
    run(hidden[:64].detach().requires_grad_(), weight[:512].detach().requires_grad_(), labels[:64] % 512)
    hidden.grad = weight.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    logp = run(hidden, weight, labels)
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "impl": impl,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "extra_peak_mib": (peak - baseline) / 1024,
        "seconds": elapsed,
        "checksum": float(logp.double().sum()),
    }


def measure(impl: str, n: int, d: int, v: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--tokens", str(n), "--hidden", str(d), "--vocab", str(v),
           "--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--impls", default="naive,torch")
    parser.add_argument("--check", type=float, default=None, help="fail if any fused/naive extra-peak ratio exceeds it")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.hidden, args.vocab, args.dtype)))
        return 0

    shape = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype)
    rows = [measure(impl, args.tokens, args.hidden, args.vocab, args.dtype) for impl in args.impls.split(",")]
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}"
    print(f"linear_token_logprobs forward+backward, N={args.tokens} D={args.hidden} V={args.vocab} {args.dtype}, "
          f"CPU ({machine})")
    print(f"{'impl':<10} {'extra peak MiB':>15} {'vs naive':>9} {'seconds':>8}")
    failed = False
    for r in rows:
        ratio = r["extra_peak_mib"] / naive["extra_peak_mib"] if naive else float("nan")
        r["ratio_to_naive"] = ratio
        print(f"{r['impl']:<10} {r['extra_peak_mib']:>15.1f} {ratio:>9.3f} {r['seconds']:>8.2f}")
        if args.check is not None and r["impl"] != "naive" and ratio > args.check:
            failed = True
    if naive:
        for r in rows:
            assert abs(r["checksum"] - naive["checksum"]) <= 1e-4 * abs(naive["checksum"]), f"{r['impl']} disagrees"
    if not args.no_save:
        out_dir = RESULTS / "cpu"
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "memory_linear_logprobs", "shape": shape, "machine": machine, "results": rows}
        (out_dir / "memory_linear_logprobs.json").write_text(json.dumps(record, indent=2) + "\n")
    if failed:
        print(f"FAIL: a fused implementation used more than {args.check:.0%} of the naive extra peak")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
