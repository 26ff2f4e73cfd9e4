"""The CUDA half of ``python -m dpo_kernels.tools.compile_check --cuda``: every ``csrc/**/*.cu`` compiled with
``nvcc`` for sm_80 and sm_90 with ``ptxas -v``, one row per kernel with registers, spill bytes and shared memory.
The ``.cu`` files hold no torch headers, so this runs wherever ``nvcc`` is, with or without a CUDA build of torch.
It also links them into one shared library, which proves the ``extern "C"`` launchers resolve, and parses
``csrc/cuda_bindings.cpp`` against this torch's headers (:func:`_check_bindings`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ARCHS = (80, 90)
_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)'")
_SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def csrc_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "csrc"
    if not path.is_dir():
        raise FileNotFoundError(f"no csrc/ at {path}: run the CUDA check from a source checkout of dpo_kernels")
    return path


def _demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    """``void dpo_kernels::cuda::(anonymous namespace)::kernel<float, 4, 32, 4, true>(args)`` -> ``kernel<...>``."""
    name = name.removeprefix("void ").replace("dpo_kernels::cuda::(anonymous namespace)::", "")
    return name.split("(", 1)[0]


def _parse(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m["name"], "arch": int(m["arch"]), "spill": 0, "regs": None, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current["spill"] = int(m["stores"]) + int(m["loads"])
        m = _USED.search(line)
        if m:
            current["regs"] = int(m["regs"])
            smem = _SMEM.search(line)
            current["smem"] = int(smem["smem"]) if smem else 0
    names = _demangle([r["name"] for r in rows])
    for row, name in zip(rows, names, strict=True):
        row["name"] = _short(name)
    return rows


def _toolkit_includes(nvcc: Path, tmp: Path) -> list[str]:
    """The CUDA toolkit's include directories, as ``nvcc`` itself passes them (``--dryrun``: ``INCLUDES`` and
    ``SYSTEM_INCLUDES``; ``nvcc`` may be a wrapper script elsewhere)."""
    probe = tmp / "probe.cu"
    probe.write_text("")
    out = subprocess.run([str(nvcc), "--dryrun", "-c", str(probe), "-o", str(tmp / "probe.o")], capture_output=True,
                         text=True)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            dirs += re.findall(r'(?:-I|"-isystem" ")([^" ]+)', line)
    return list(dict.fromkeys(dirs))


def _check_bindings(root: Path, nvcc: Path, tmp: Path) -> str | None:
    """``csrc/cuda_bindings.cpp`` (the torch-facing CUDA ops, built only into a CUDA build of the extension) parsed
    with ``-DDPO_KERNELS_WITH_CUDA`` against this torch's headers and the CUDA toolkit's: the compiler's errors ("" when
    it parses), or ``None`` when no host compiler is found. A CPU build of torch ships c10's CUDA headers but not the
    one its CMake generates; an empty stand-in takes its place."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        print("no host C++ compiler: cuda_bindings.cpp not checked")
        return None
    import sysconfig

    from torch.utils import cpp_extension

    stand_in = tmp / "stand_in" / "c10" / "cuda" / "impl"
    stand_in.mkdir(parents=True, exist_ok=True)
    (stand_in / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [*cpp_extension.include_paths(), *_toolkit_includes(nvcc, tmp), sysconfig.get_paths()["include"],
                str(tmp / "stand_in")]  # the stand-in last: a real one wins
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-w", "-DDPO_KERNELS_WITH_CUDA",
                             *(f"-I{d}" for d in includes), str(root / "cuda_bindings.cpp")],
                            capture_output=True, text=True)
    return "" if result.returncode == 0 else result.stderr


def check() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: the CUDA compile check needs the CUDA toolkit")
        return 1
    root = csrc_dir()
    sources = sorted(root.rglob("*.cu"))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    common = [nvcc, "-O3", "-std=c++17", "-lineinfo", f"-I{root}", *gencode]
    print(f"{'file':<18} {'kernel':<62} {'arch':<6} {'regs':>5} {'spill B':>8} {'smem B':>7}  result")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        for src in sources:
            obj = Path(tmp) / (src.stem + ".o")
            result = subprocess.run([*common, "-Xptxas", "-v", "-Xcompiler", "-fPIC", "-c", str(src), "-o", str(obj)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                failures += 1
                print(f"{src.name:<18} FAILED to compile:\n{result.stderr[-2000:]}")
                continue
            objects.append(str(obj))
            for row in _parse(result.stderr + result.stdout):
                ok = row["spill"] == 0
                failures += not ok
                print(f"{src.name:<18} {row['name'][:62]:<62} sm_{row['arch']:<3} {row['regs'] or 0:>5} "
                      f"{row['spill']:>8} {row['smem']:>7}  {'ok' if ok else 'SPILLS'}")
        if objects:
            link = subprocess.run([*common, "-shared", *objects, "-o", str(Path(tmp) / "libdpo_cuda.so")],
                                  capture_output=True, text=True)
            if link.returncode != 0:
                failures += 1
                print(f"linking the CUDA objects FAILED:\n{link.stderr[-2000:]}")
            else:
                print(f"linked {len(objects)} object(s) into a shared library: the extern \"C\" launchers resolve")
        errors = _check_bindings(root, Path(nvcc), Path(tmp))
        if errors:
            failures += 1
            print(f"cuda_bindings.cpp FAILED to parse:\n{errors[-3000:]}")
        elif errors is not None:
            print("cuda_bindings.cpp parsed with this torch's headers: the torch-facing CUDA ops compile")
    print(f"\n{failures} failure(s)" if failures else "\nall CUDA kernels compiled for sm_80 and sm_90 without spills")
    return 1 if failures else 0
