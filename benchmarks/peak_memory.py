"""Peak extra CPU memory of per-token log-probs, forward + backward: the fused backends against the naive path.

Each implementation runs in its own subprocess. The child allocates the inputs, runs one small warm-up, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), records its RSS as the baseline, runs forward + backward once,
and reports ``VmHWM - baseline``: the extra peak resident memory of the computation, measured, not computed.

    python benchmarks/peak_memory.py --case linear --check 0.15   # N=4096, D=512, V=32000, fp32
    python benchmarks/peak_memory.py --case logits --check 0.10   # N=4096, V=32000, fp32

Cases: ``linear`` (``linear_token_logprobs`` from hidden states and a head) and ``logits`` (``token_logprobs``; the
logits are the non-leaf output of an op whose backward passes the gradient through, as an LM head's would be,
and the fused backends use ``inplace_backward=True``). Implementations: ``naive`` (matmul, fp32 log_softmax,
gather, autograd) and any registered backend by name (``torch``, ``cpu``, ...), for ``linear`` also as
``backend:schedule`` (``cpu:eager``). ``--check R`` exits 1 if a fused
implementation's extra peak exceeds ``R`` times the naive one. Results go to
``benchmarks/results/cpu/peak_memory_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from output import add_out_argument, add_shape_arguments, out_dir


def _child(case: str, impl: str, n: int, d: int, v: int, dtype_name: str) -> dict:
    import torch

    import dpo_kernels
    from dpo_kernels.timing import PeakMemory

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (n,), generator=g)
    if case == "linear":
        hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()

        def make():
            return hidden, weight

        def run(h, w, y):
            if impl == "naive":
                logp = torch.log_softmax((h @ w.T).float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            else:  # "backend" or "backend:schedule" (cpu:eager: the per-token eager schedule, forced)
                backend, _, schedule = impl.partition(":")
                logp = dpo_kernels.linear_token_logprobs(h, w, y, backend=backend, schedule=schedule or "auto")
            logp.sum().backward()
            return logp.detach()

        def warm_up():
            run(hidden[:64].detach().requires_grad_(), weight[:512].detach().requires_grad_(), labels[:64] % 512)
            hidden.grad = weight.grad = None

        inputs = make()
    else:
        leaf = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_()

        def run(logits, y):
            if impl == "naive":
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            else:
                logp = dpo_kernels.token_logprobs(logits, y, backend=impl, inplace_backward=True)
            logp.sum().backward()
            return logp.detach()

        def warm_up():
            small = leaf[:64, :512].detach().clone().requires_grad_()
            run(small.clone(), labels[:64] % 512)

        inputs = (leaf.clone(),)  # non-leaf logits; CloneBackward hands the gradient to leaf.grad as is

    warm_up()
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        logp = run(*inputs, labels)
        elapsed = time.perf_counter() - start
    return {
        "impl": impl,
        "baseline_mib": memory.base_mib,
        "peak_mib": memory.peak_mib,
        "extra_peak_mib": memory.mib,
        "seconds": elapsed,
        "checksum": float(logp.double().sum()),
    }


def measure(case: str, impl: str, n: int, d: int, v: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--child", impl, "--tokens", str(n), "--hidden", str(d),
           "--vocab", str(v), "--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_backends() -> list[str]:
    from dpo_kernels.ops import backends_for

    return backends_for("cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("linear", "logits"), default="linear")
    add_shape_arguments(parser, tokens=4096, hidden=512, vocab=32000, dtype="float32")
    parser.add_argument("--impls", default=None, help="comma-separated; default: naive and every available backend")
    parser.add_argument("--check", type=float, default=None, help="fail if any fused/naive extra-peak ratio exceeds it")
    parser.add_argument("--no-save", action="store_true", help="print only")
    add_out_argument(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.case, args.child, args.tokens, args.hidden, args.vocab, args.dtype)))
        return 0

    impls = args.impls.split(",") if args.impls else ["naive", *_cpu_backends()]
    shape = dict(tokens=args.tokens, vocab=args.vocab, dtype=args.dtype)
    if args.case == "linear":
        shape["hidden"] = args.hidden
    rows = [measure(args.case, impl, args.tokens, args.hidden, args.vocab, args.dtype) for impl in impls]
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}"
    what = "linear_token_logprobs" if args.case == "linear" else "token_logprobs (inplace_backward for fused)"
    dims = f"N={args.tokens}" + (f" D={args.hidden}" if args.case == "linear" else "") + f" V={args.vocab}"
    print(f"{what} forward+backward, {dims} {args.dtype}, CPU ({machine})")
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
        record = {"benchmark": f"peak_memory_{args.case}", "shape": shape, "machine": machine, "results": rows}
        path = out_dir(args.out, "cpu") / f"peak_memory_{args.case}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print("wrote", path)
    if failed:
        print(f"FAIL: a fused implementation used more than {args.check:.0%} of the naive extra peak")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
