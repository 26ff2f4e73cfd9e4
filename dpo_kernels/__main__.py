"""``python -m dpo_kernels``: print the backend report, then check every available backend against the reference.

The self-check runs each primitive and ``fused_dpo_loss`` (DPO and TDPO) on small synthetic data, value and
gradients, in fp32, and prints the largest relative error it saw per backend. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .ops.registry import available_backends, resolve_backend
from .selfcheck import run_selfcheck


def print_report(device: torch.device) -> None:
    print(f"dpo_kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"device for the self-check: {device}   CUDA device: {cuda}")
    print()
    print(f"{'backend':<10} {'available':<10} {'devices':<10} notes")
    for status in available_backends().values():
        note = status.summary if status.available else status.reason
        print(f"{status.name:<10} {'yes' if status.available else 'no':<10} {','.join(status.device_types):<10} {note}")
    chosen, _ = resolve_backend("auto", device)
    print(f"\nbackend='auto' on {device.type}: {chosen}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--report-only", action="store_true", help="print the backend report and exit")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print_report(device)
    if args.report_only:
        return 0
    print()
    return 0 if run_selfcheck(device) else 1


if __name__ == "__main__":
    sys.exit(main())
