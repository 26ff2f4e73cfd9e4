"""What ``setup.py`` decides about the CUDA part of ``dpo_kernels._C``, and the record it leaves for run time.

Kept free of package imports: ``setup.py`` loads this file by path, before ``dpo_kernels`` (or anything but the
standard library and torch) can be imported. The record, ``_build_info.json`` beside this file, says why the CUDA
kernels were left out, so that ``python -m dpo_kernels`` can report the ``cuda`` backend unavailable *with the
reason* instead of the install failing: an ``nvcc`` whose major version differs from torch's CUDA makes
``torch.utils.cpp_extension.BuildExtension`` raise for a CUDA extension, which would fail the whole ``pip install``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def nvcc_version(cuda_home: str | None) -> str | None:
    """``"13.0"`` from ``$CUDA_HOME/bin/nvcc --version``, ``None`` when there is no runnable nvcc."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return None if match is None else f"{match.group(1)}.{match.group(2)}"


def cuda_decision(have_cuda_sources: bool, torch_cuda: str | None, cuda_home: str | None,
                  nvcc: str | None) -> tuple[bool, str | None]:
    """``(build the CUDA kernels, why not)``: they need CUDA sources, a CUDA build of torch, an nvcc, and the same
    CUDA major version on both sides."""
    if not have_cuda_sources:
        return False, "there are no CUDA sources"
    if torch_cuda is None:
        return False, "torch is not a CUDA build"
    if cuda_home is None or nvcc is None:
        return False, "no nvcc was found (CUDA_HOME)"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return False, (f"nvcc {nvcc} (at {cuda_home}) differs in its major version from torch's CUDA {torch_cuda}; "
                       "install the matching CUDA toolkit (or point CUDA_HOME at it) and reinstall")
    return True, None


def write_build_info(cuda_reason: str | None, path: str = BUILD_INFO) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cuda_left_out": cuda_reason}, f)


def read_build_info(path: str = BUILD_INFO) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
