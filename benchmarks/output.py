"""Where the benchmark scripts write: ``--out DIR``, by default ``benchmarks/out/<device>/`` (ignored by git).

The committed results under ``benchmarks/results/<device>/`` change only when a run names that folder on purpose
(``--out benchmarks/results/cpu``), so running the README's commands never rewrites them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "out"


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default: benchmarks/out/<device>/, not tracked by git; "
                             "benchmarks/results/<device>/ holds the committed ones)")


def add_shape_arguments(parser: argparse.ArgumentParser, **defaults: int | str) -> None:
    """``--tokens``, ``--pairs``, ``--seq``, ``--hidden``, ``--vocab`` (ints) and ``--dtype``: the ones given, with
    their defaults, in that order."""
    for name in ("tokens", "pairs", "seq", "hidden", "vocab", "dtype"):
        if name in defaults:
            parser.add_argument(f"--{name}", type=type(defaults[name]), default=defaults[name])


def out_dir(out: Path | None, device: str) -> Path:
    """The folder to write to, created: ``out`` as given, else ``benchmarks/out/<device>``."""
    folder = DEFAULT / device if out is None else out
    folder.mkdir(parents=True, exist_ok=True)
    return folder
