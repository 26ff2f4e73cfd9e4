"""Run the field benchmarks for a preset and write a markdown table and plots to ``--out`` (default
``benchmarks/out/<device>/``, untracked; ``--out benchmarks/results/<device>`` updates the committed report).

    python benchmarks/report.py --preset cpu                 # run pytest-benchmark, measure memory, write the report
    python benchmarks/report.py --preset cpu --reuse-json    # rebuild the report from the last field.json

Time: median of pytest-benchmark's rounds (``test_field.py``). Peak extra memory of forward+backward: on CPU the
peak RSS of a subprocess per (case, implementation, size) above its RSS after building the inputs; on GPU the peak
allocator bytes recorded by the benchmark. Outputs: ``field.json``, ``memory.json``, ``field.md``,
``time_vs_tokens.png`` and ``memory_vs_tokens.png`` (one panel per case, one line per implementation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from output import add_out_argument, out_dir  # noqa: E402


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = "CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def _memory_child(preset: str, case: str, impl_name: str, tokens: int) -> float:
    from field import PRESETS, implementations, make_inputs

    from dpo_kernels.timing import PeakMemory

    p = PRESETS[preset]
    impl = next(i for i in implementations(case) if i.name == impl_name and p.device in i.devices)
    x = make_inputs(case, p, tokens)
    leaves = {k: (v.detach().requires_grad_(k in ("logits", "hidden", "weight")) if v.is_floating_point() else v)
              for k, v in x.items()}
    with PeakMemory("cpu") as memory:
        impl.run(leaves).float().sum().backward()
    return memory.mib


def _run_benchmarks(preset: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_field.py"), "--benchmark-only", "-q", "-p",
           "no:cacheprovider", "-k", f"{preset}-", f"--benchmark-json={out / 'field.json'}"]
    subprocess.run(cmd, check=True, cwd=HERE)


def _measure_memory(preset: str, rows: list[dict], out: Path) -> dict:
    memory = {}
    for r in rows:
        key = (r["case"], r["impl"], r["tokens"])
        if key in memory or r["mode"] != "fwd+bwd":
            continue
        if r["device"] == "cuda":
            memory[key] = r.get("peak_allocated_mib")
            continue
        cmd = [sys.executable, __file__, "--memory-child", preset, r["case"], r["impl"], str(r["tokens"])]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        memory[key] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    (out / "memory.json").write_text(json.dumps([{"case": c, "impl": i, "tokens": t, "peak_extra_mib": m}
                                                 for (c, i, t), m in memory.items()], indent=2) + "\n")
    return memory


def _rows(field_json: Path) -> list[dict]:
    data = json.loads(field_json.read_text())
    return [dict(b["extra_info"], median=b["stats"]["median"]) for b in data["benchmarks"]]


def _table(rows: list[dict], memory: dict, machine: str, preset: str) -> str:
    times = defaultdict(dict)
    for r in rows:
        times[(r["case"], r["tokens"], r["impl"])][r["mode"]] = r["median"]
    lines = [f"Preset `{preset}` on {machine}. Time: median seconds; memory: peak extra MiB of forward+backward; "
             "`vs naive`: forward+backward time relative to the naive path.", "",
             "| case | N | implementation | fwd s | fwd+bwd s | vs naive | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (case, tokens, impl), t in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[1].get("fwd+bwd", 0))):
        naive = times.get((case, tokens, "naive"), {}).get("fwd+bwd")
        ratio = f"{t['fwd+bwd'] / naive:.2f}" if naive and "fwd+bwd" in t else ""
        mib = memory.get((case, impl, tokens))
        lines.append(f"| {case} | {tokens} | {impl} | {t.get('fwd', float('nan')):.3f} | "
                     f"{t.get('fwd+bwd', float('nan')):.3f} | {ratio} | {'' if mib is None else f'{mib:.0f}'} |")
    return "\n".join(lines)


def _plots(rows: list[dict], memory: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from field import CASES

    impls = sorted({r["impl"] for r in rows})
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}  # one colour per impl everywhere
    written = []
    for metric, fname, ylabel in (("time", "time_vs_tokens.png", "forward+backward, s (median)"),
                                  ("memory", "memory_vs_tokens.png", "peak extra memory, MiB")):
        rows_of_panels = -(-len(CASES) // 3)
        fig, axes = plt.subplots(rows_of_panels, 3, figsize=(15, 4.25 * rows_of_panels))
        for ax in axes.flat[len(CASES):]:
            ax.set_visible(False)
        for ax, case in zip(axes.flat, CASES):
            series = defaultdict(dict)
            for r in rows:
                if r["case"] == case and r["mode"] == "fwd+bwd":
                    value = r["median"] if metric == "time" else memory.get((case, r["impl"], r["tokens"]))
                    if value is not None:
                        series[r["impl"]][r["tokens"]] = value
            for impl, points in sorted(series.items()):
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", label=impl, color=colors[impl])
            ax.set_title(case)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title}: {ylabel}")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="cpu, llama3 or gemma2 (default: cpu, or llama3 on a GPU)")
    parser.add_argument("--reuse-json", action="store_true",
                        help="do not rerun the benchmarks (nor the memory measurements, when memory.json exists)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.memory_child:
        preset, case, impl, tokens = args.memory_child
        print(_memory_child(preset, case, impl, int(tokens)))
        return 0
    import torch

    from field import PRESETS

    preset = args.preset or ("llama3" if torch.cuda.is_available() else "cpu")
    device = PRESETS[preset].device
    out = out_dir(args.out, device if device == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_"))
    if not args.reuse_json:
        _run_benchmarks(preset, out)
    rows = [r for r in _rows(out / "field.json") if r["preset"] == preset]
    if args.reuse_json and (out / "memory.json").exists():
        memory = {(m["case"], m["impl"], m["tokens"]): m["peak_extra_mib"]
                  for m in json.loads((out / "memory.json").read_text())}
    else:
        memory = _measure_memory(preset, rows, out)
    machine = _machine(device)
    table = _table(rows, memory, machine, preset)
    (out / "field.md").write_text(table + "\n")
    plots = _plots(rows, memory, out, f"{preset} on {machine}")
    print(table)
    print("\nwrote", out / "field.md", *plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
