"""Time of the linear path against the naive path on this machine, interleaved round by round.

    python benchmarks/interleaved.py                      # N=4096, D=512, V=32000, fp32, 7 rounds
    python benchmarks/interleaved.py --case kl --rounds 5 --json /tmp/linear_kl.json
    python benchmarks/interleaved.py --head frozen        # the hidden states' gradient only (LoRA)
    python benchmarks/interleaved.py --impls naive,cpu,cpu:eager   # a backend:schedule, the per-token eager one

Each round runs every implementation once, forward + backward, in a fresh order (a shared, noisy machine slows
whole stretches of time, which then hit every implementation of a round alike); the report gives each one's median
and the median over rounds of its time divided by the naive time of the same round. One warm-up call per
implementation comes first and is not timed.

Cases: ``logprobs`` (``linear_token_logprobs``) and ``kl`` (``linear_token_logprobs_and_kl``, gradients through
both outputs). ``naive`` is the full-logits path: ``h @ W.T``, fp32 ``log_softmax``, gather (and the KL from the
two log-softmaxes), autograd. With a trainable head (``--head trainable``, the default) the linear path does
``8 N D V`` FLOPs against naive's ``6 N D V`` (``12`` against ``8`` with the KL), so it can only tie or win through
the memory traffic it saves; with a frozen head (``--head frozen``: only the hidden states get a gradient) both do
``4 N D V`` (``8`` with the KL): the linear path forms the hidden states' gradient in its forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

import dpo_kernels
from dpo_kernels.ops import backends_for
from output import add_shape_arguments


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(n, d, generator=g).to(dtype),
        "weight": (torch.randn(v, d, generator=g) / d**0.5).to(dtype),
        "ref_hidden": torch.randn(n, d, generator=g).to(dtype),
        "ref_weight": (torch.randn(v, d, generator=g) / d**0.5).to(dtype),
        "labels": torch.randint(0, v, (n,), generator=g),
    }


def _naive(case: str, x: dict, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax((h @ w.T).float(), dim=-1)
    logp = logprobs.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    if case == "logprobs":
        return logp.sum()
    with torch.no_grad():
        ref = torch.log_softmax((x["ref_hidden"] @ x["ref_weight"].T).float(), dim=-1)
    kl = (ref.exp() * (ref - logprobs)).sum(-1)
    return logp.sum() + 0.1 * kl.sum()


def _ours(case: str, impl: str):
    """``impl``: a backend, or ``backend:schedule`` (e.g. ``cpu:eager``: the per-token eager schedule, forced)."""
    backend, _, schedule = impl.partition(":")
    schedule = schedule or "auto"

    def run(x: dict, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if case == "logprobs":
            return dpo_kernels.linear_token_logprobs(h, w, x["labels"], backend=backend, schedule=schedule).sum()
        logp, _, kl = dpo_kernels.linear_token_logprobs_and_kl(h, w, x["ref_hidden"], x["ref_weight"], x["labels"],
                                                               backend=backend, schedule=schedule)
        return logp.sum() + 0.1 * kl.sum()
    return run


def measure(case: str, n: int, d: int, v: int, dtype: torch.dtype, rounds: int, impls: list[str], seed: int = 0,
            head: str = "trainable"):
    x = _inputs(n, d, v, dtype)
    runs = {name: (lambda x, h, w: _naive(case, x, h, w)) if name == "naive" else _ours(case, name) for name in impls}

    def once(fn) -> float:
        h, w = x["hidden"].detach().requires_grad_(), x["weight"].detach().requires_grad_(head == "trainable")
        start = time.perf_counter()
        fn(x, h, w).backward()
        return time.perf_counter() - start

    for fn in runs.values():
        once(fn)
    times = {name: [] for name in runs}
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(once(runs[name]))
    rows = []
    for name, ts in times.items():
        row = {"impl": name, "median_s": statistics.median(ts), "times_s": ts}
        if "naive" in times:
            row["median_ratio_to_naive"] = statistics.median(t / b for t, b in zip(ts, times["naive"], strict=True))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("logprobs", "kl"), default="logprobs")
    parser.add_argument("--head", choices=("trainable", "frozen"), default="trainable")
    add_shape_arguments(parser, tokens=4096, hidden=512, vocab=32000, dtype="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--impls", default=None, help="comma-separated backends, or backend:schedule (cpu:eager); "
                        "default: naive and every CPU backend")
    parser.add_argument("--json", default=None, help="write the measurements here (nothing is written otherwise)")
    args = parser.parse_args(argv)
    impls = args.impls.split(",") if args.impls else ["naive", *(b for b in backends_for("cpu") if b != "triton")]
    dtype = getattr(torch, args.dtype)
    rows = measure(args.case, args.tokens, args.hidden, args.vocab, dtype, args.rounds, impls, head=args.head)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"{args.case} fwd+bwd, {args.head} head, N={args.tokens} D={args.hidden} V={args.vocab} {args.dtype}, {args.rounds} "
          f"interleaved rounds ({machine})")
    print(f"{'impl':<10} {'median s':>9} {'median ratio to naive':>22}")
    for r in rows:
        ratio = r.get("median_ratio_to_naive", float("nan"))
        print(f"{r['impl']:<10} {r['median_s']:>9.3f} {ratio:>22.3f}")
    if args.json:
        record = {"case": args.case, "head": args.head, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
                  "dtype": args.dtype, "rounds": args.rounds, "machine": machine, "results": rows}
        with open(args.json, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
