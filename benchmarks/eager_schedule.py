"""The eager schedule against the recompute schedule of ``fused_dpo_loss`` from hidden states, on this machine.

    python benchmarks/eager_schedule.py                     # 4 pairs x 512 tokens, a quarter masked, D=512, V=32000
    python benchmarks/eager_schedule.py --check             # exit 1 past the goals (0.82x sigmoid, 0.70x tdpo2)
    python benchmarks/eager_schedule.py --keep-buffers      # times inside dpo_kernels.keep_cpu_tile_buffers()

Time: forward + backward of the loss, both schedules interleaved round by round in a fresh order (a noisy machine
slows whole stretches, which then hit both alike); the report gives the median over rounds of eager / recompute in
the same round, after one untimed warm-up each (the goal is checked on it), and beside it the best eager time over
the best recompute time, the estimate least disturbed by other work on a shared machine. Memory: each schedule in
its own subprocess, the peak extra resident memory of one forward + backward (``dpo_kernels.timing.PeakMemory``:
``VmHWM`` growth), measured; the eager one is compared with ``eager_budget_mb``. Results go to ``benchmarks/results/cpu/eager_schedule.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

import dpo_kernels
from output import add_out_argument, add_shape_arguments, out_dir

GOALS = {"sigmoid": 0.82, "tdpo2": 0.70}


def _inputs(pairs: int, seq: int, d: int, v: int, masked: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (2 * pairs, seq), generator=g)
    labels[:, : int(seq * masked)] = -100  # the prompts
    return dict(
        labels=labels,
        policy_hidden=torch.randn(2 * pairs, seq, d, generator=g).requires_grad_(),
        lm_head_weight=(torch.randn(v, d, generator=g) / d**0.5).requires_grad_(),
        ref_hidden=torch.randn(2 * pairs, seq, d, generator=g),
        ref_lm_head_weight=torch.randn(v, d, generator=g) / d**0.5,
    )


def _step(inputs: dict, loss_type: str, schedule: str, budget_mb: float) -> float:
    from dpo_kernels import fused_dpo_loss

    inputs["policy_hidden"].grad = inputs["lm_head_weight"].grad = None
    out = fused_dpo_loss(**inputs, loss_type=loss_type, backend="cpu", schedule=schedule, eager_budget_mb=budget_mb)
    out.loss.backward()
    return float(out.loss.detach())


def _child(args) -> dict:
    from dpo_kernels.timing import PeakMemory

    inputs = _inputs(args.pairs, args.seq, args.hidden, args.vocab, args.masked)
    small = _inputs(1, 16, args.hidden, 512, args.masked)
    _step(small, args.child_loss, args.child, args.budget_mb)  # loads the kernels; not measured
    with PeakMemory("cpu") as memory:
        loss = _step(inputs, args.child_loss, args.child, args.budget_mb)
    return {"schedule": args.child, "loss_type": args.child_loss, "extra_peak_mib": memory.mib, "loss": loss}


def _peak(args, loss_type: str, schedule: str) -> dict:
    cmd = [sys.executable, __file__, "--child", schedule, "--child-loss", loss_type, "--pairs", str(args.pairs),
           "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--masked",
           str(args.masked), "--budget-mb", str(args.budget_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, pairs=4, seq=512, hidden=512, vocab=32000)
    parser.add_argument("--masked", type=float, default=0.25)
    parser.add_argument("--budget-mb", type=float, default=512.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--keep-buffers", action="store_true",
                        help="time inside dpo_kernels.keep_cpu_tile_buffers(budget): the store stays between calls")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when a time ratio misses its goal {GOALS}")
    parser.add_argument("--no-save", action="store_true")
    add_out_argument(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-loss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    torch.manual_seed(0)
    inputs = _inputs(args.pairs, args.seq, args.hidden, args.vocab, args.masked)
    kept = int((inputs["labels"] != -100).sum())
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"fused_dpo_loss fwd+bwd, {args.pairs} pairs x {args.seq} tokens ({kept} kept), D={args.hidden} "
          f"V={args.vocab} fp32, backend='cpu', eager_budget_mb={args.budget_mb:g}; {machine}")
    keep = dpo_kernels.keep_cpu_tile_buffers(args.budget_mb) if args.keep_buffers else contextlib.nullcontext()
    with keep:
        results, failed = _time_schedules(args, inputs)
    if not args.no_save:
        record = {"shape": vars(args) | {"kept_tokens": kept}, "machine": machine, "results": results}
        path = out_dir(args.out, "cpu") / "eager_schedule.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 1 if failed else 0


def _time_schedules(args, inputs) -> tuple[dict, bool]:
    results, failed = {}, False
    for loss_type in GOALS:
        times = {"eager": [], "recompute": []}
        for schedule in times:  # warm-up, untimed
            _step(inputs, loss_type, schedule, args.budget_mb)
        ratios = []
        for _ in range(args.rounds):
            order = list(times)
            random.shuffle(order)
            this_round = {}
            for schedule in order:
                start = time.perf_counter()
                _step(inputs, loss_type, schedule, args.budget_mb)
                this_round[schedule] = time.perf_counter() - start
                times[schedule].append(this_round[schedule])
            ratios.append(this_round["eager"] / this_round["recompute"])
        peaks = {schedule: _peak(args, loss_type, schedule)["extra_peak_mib"] for schedule in times}
        ratio = statistics.median(ratios)
        best = min(times["eager"]) / min(times["recompute"])
        results[loss_type] = {
            "median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "best_seconds": {k: min(v) for k, v in times.items()},
            "eager_over_recompute": ratio,
            "best_over_best": best,
            "ratios": ratios,
            "extra_peak_mib": peaks,
            "goal": GOALS[loss_type],
        }
        print(f"{loss_type:<8} eager {statistics.median(times['eager']):6.2f} s, recompute "
              f"{statistics.median(times['recompute']):6.2f} s: {ratio:.3f}x (goal <= {GOALS[loss_type]}; best of rounds "
              f"{best:.3f}x); extra peak "
              f"eager {peaks['eager']:.0f} MiB, recompute {peaks['recompute']:.0f} MiB (budget {args.budget_mb:g})")
        failed |= args.check and ratio > GOALS[loss_type]
    return results, failed


if __name__ == "__main__":
    sys.exit(main())
