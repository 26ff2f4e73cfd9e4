"""Build and install dpo_kernels.

The pure-Python package always installs. ``dpo_kernels._C`` is built from ``csrc/`` when there are C++ sources,
torch is importable in the build environment (install with ``pip install --no-build-isolation``, after torch, so
that pip never resolves a torch of its own) and a C++ compiler exists; CUDA sources are added when ``nvcc`` and a
CUDA build of torch of the same CUDA major version are present (otherwise the CPU part is built and the reason is
recorded for ``python -m dpo_kernels``, see ``dpo_kernels/build_config.py``). ``DPO_KERNELS_NO_EXTENSION=1`` skips
the extension. Without ``_C`` the ``cpu`` and ``cuda`` backends report themselves unavailable and everything else
works.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_config():
    """``dpo_kernels/build_config.py``, loaded by path: the package itself cannot be imported while it is built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dpo_kernels_build_config",
                                                  os.path.join(HERE, "dpo_kernels", "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_modules():
    """The ``_C`` extension and its build command, or ``([], {})`` with the reason printed."""
    if os.environ.get("DPO_KERNELS_NO_EXTENSION", "0") == "1":
        print("dpo_kernels: DPO_KERNELS_NO_EXTENSION=1, not building dpo_kernels._C")
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not cpp_sources:
        print("dpo_kernels: no C++ sources under csrc/, building the pure-Python package only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "dpo_kernels: building dpo_kernels._C needs torch in the build environment; install torch first, then "
            "`pip install --no-build-isolation .` (or set DPO_KERNELS_NO_EXTENSION=1 to skip the extension)"
        ) from exc
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("dpo_kernels: no C++ compiler found (set CXX, or DPO_KERNELS_NO_EXTENSION=1 to skip)")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    build_config = _build_config()
    use_cuda, why_not = build_config.cuda_decision(
        bool(cuda_sources), torch.version.cuda, cpp_extension.CUDA_HOME,
        build_config.nvcc_version(cpp_extension.CUDA_HOME))
    if cuda_sources and not use_cuda:
        print(f"dpo_kernels: building the CPU kernels only: {why_not}")
    build_config.write_build_info(None if use_cuda else why_not)
    extension_cls = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    cxx_flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # at::vec's AVX2 implementation; dpo_kernels refuses the cpu backend on a CPU without AVX2 at run time.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    ext = extension_cls(
        name="dpo_kernels._C",
        sources=cpp_sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
        define_macros=[("DPO_KERNELS_WITH_CUDA", "1")] if use_cuda else [],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_modules()

setup(
    name="dpo_kernels",
    version="0.1.0",
    description="Fused kernels for DPO-family preference optimisation without materialising [batch, seq, vocab]",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dpo_kernels", "dpo_kernels.*"]),
    package_data={"dpo_kernels": ["MATH.md", "GUIDE.md", "TRAINERS.md", "DESIGN.md", "_build_info.json"]},
    license="MIT",
    # torch is required but never resolved here on a machine that has one: install torch first (see README).
    install_requires=["torch>=2.1"],
    # triton: CUDA builds of torch already ship it; on a CPU machine the tests run its kernels in the interpreter.
    extras_require={
        # deepspeed: pure Python here (its ops build on first use), for the ZeRO-3 tests on DeepSpeed's CPU accelerator
        "test": ["pytest>=7", "numpy", "triton>=3.2; platform_system == 'Linux'", "trl>=1.14,<1.17", "peft",
                 "deepspeed; platform_system == 'Linux'"],
        "trl": ["trl>=1.14,<1.17"],
        "demo": ["transformers>=4.45", "tqdm"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "trl>=1.14,<1.17", "liger-kernel", "cut-cross-entropy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
