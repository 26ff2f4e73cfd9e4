"""Ratios of each implementation's median time to the naive path's, from a pytest-benchmark JSON file.

    python benchmarks/cpu_ratios.py benchmarks/out/cpu/cpu_backend.json [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def ratios(path: str) -> list[tuple[str, str, float, float]]:
    data = json.load(open(path))
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = re.search(r"\[(.*)\]", bench["name"]).group(1)
        groups[bench["group"]][impl] = bench["stats"]["median"]
    rows = []
    for group, times in groups.items():
        naive = times.get("naive")
        for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
            rows.append((group, impl, t, t / naive if naive else float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    data = json.load(open(args.json))
    machine = data["machine_info"]
    lines = [
        f"CPU: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical cores; median of the rounds",
        "",
        "| case | implementation | median s | vs naive |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {g} | {impl} | {t:.3f} | {r:.2f} |" for g, impl, t, r in ratios(args.json)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text + "\n")


if __name__ == "__main__":
    main()
