"""The backend table and the dispatcher.

A backend is a module whose ``KERNELS`` (:class:`~dpo_kernels.ops.backend.BackendKernels`) fills two slots: the
from-logits row kernels (:mod:`dpo_kernels.ops.logits_path`) and the linear path's tile kernels
(:mod:`dpo_kernels.ops.linear.contract`); every path runs on them. The reference oracle has no ``KERNELS`` (autograd
through full logits; :mod:`dpo_kernels.ops.dispatch` calls its functions). Adding a backend is that module plus one
``BackendSpec`` row in ``_BACKENDS``: its module, the device types and dtypes it runs on, how it checks its own
availability, and where ``backend="auto"`` may pick it.

:func:`resolve_backend` answers which backend runs and :func:`backend_kernels` its kernels (refusing the oracle,
which has none); nothing else looks a backend up.

``backend="auto"`` picks the available backend with the best rank for the input's device type and dtype and logs
the choice at debug level. Naming a backend explicitly never falls back: an unavailable one, or one that cannot take
the inputs' device or dtype, raises ``BackendUnavailableError`` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger("dpo_kernels")

ANY_DEVICE = "*"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, missing dependency, wrong device)."""


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table.

    Attributes:
        name: the value of ``backend=`` that selects it.
        module: import path of the module holding its ``KERNELS`` (or, for the oracle, its entry points).
        devices: returns the ``torch.device.type`` values it runs on now (``"*"``: any).
        auto_devices: device types on which ``backend="auto"`` may pick it (``"*"``: any; empty: never).
        auto_rank: lower is preferred by ``backend="auto"``.
        dtypes: input dtypes it takes; ``None`` means every float dtype.
        check: returns ``None`` when usable here, else the reason it is not.
        summary: one line for the report.
    """

    name: str
    module: str
    devices: Callable[[], tuple[str, ...]]
    auto_devices: tuple[str, ...]
    auto_rank: int
    dtypes: tuple[torch.dtype, ...] | None
    check: Callable[[], str | None]
    summary: str

    def runs_on(self, device_type: str) -> bool:
        return _matches(self.devices(), device_type)

    def takes(self, dtypes: tuple[torch.dtype, ...]) -> bool:
        return self.dtypes is None or all(d in self.dtypes for d in dtypes)


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend, as reported by :func:`available_backends`."""

    name: str
    available: bool
    reason: str
    device_types: tuple[str, ...]
    summary: str


def _matches(device_types: tuple[str, ...], device_type: str) -> bool:
    return ANY_DEVICE in device_types or device_type in device_types


def _always() -> str | None:
    return None


def _any_device() -> tuple[str, ...]:
    return (ANY_DEVICE,)


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through Triton's interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if triton_interpreting() else ("cuda",)


def _triton_check() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships with CUDA builds of torch on Linux; or pip install triton)"
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors through Triton's interpreter)"
    return None


def _extension_cpu_check() -> str | None:
    from . import extension  # imports torch only; _C itself is imported on first use

    return extension.cpu_unavailable_reason()


def _extension_cuda_check() -> str | None:
    from . import extension

    return extension.cuda_unavailable_reason()


_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)

# One row a backend: name, module, devices, auto_devices, auto_rank, dtypes, check, summary (see BackendSpec).
_BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("reference", "dpo_kernels.ops.reference", _any_device, (), 1000, None, _always,
                "naive PyTorch oracle; materialises [N, V] (tests and tiny inputs only)"),
    BackendSpec("torch", "dpo_kernels.ops.torch_chunked", _any_device, (ANY_DEVICE,), 100, None, _always,
                "chunked PyTorch, memory-bounded, any device (the fallback)"),
    BackendSpec("cpu", "dpo_kernels.ops.cpp_backend", lambda: ("cpu",), ("cpu",), 50, None, _extension_cpu_check,
                "C++ kernels of dpo_kernels._C: OpenMP over rows, AVX2 inner loops (the fast CPU path)"),
    BackendSpec("cuda", "dpo_kernels.ops.cpp_backend", lambda: ("cuda",), ("cuda",), 20, _HALF_AND_SINGLE,
                _extension_cuda_check, "CUDA C++ kernels of dpo_kernels._C, cuBLAS tiles for the head"),
    BackendSpec("triton", "dpo_kernels.ops.triton_kernels", _triton_devices, ("cuda",), 10, _HALF_AND_SINGLE,
                _triton_check, "Triton kernels: one pass over the vocabulary from logits; tile kernels for the linear "
                "path"),
)}


def backends_for(device_type: str) -> list[str]:
    """Names of the backends available here that run on ``device_type`` tensors, the reference oracle excepted."""
    return [
        spec.name for spec in _BACKENDS.values()
        if spec.name != "reference" and spec.runs_on(device_type) and spec.check() is None
    ]


def _spec(name: str) -> BackendSpec:
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"backend must be one of {known}; got {name!r}") from None


def require_backend(name: object, *, available: bool = False) -> str:
    """``name`` if it is ``"auto"`` or a registered backend (and, with ``available``, one this machine can run),
    for options checked before any kernel: a trainer's config or ``patch()``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not ``"auto"`` nor a registered backend.
        BackendUnavailableError: ``available`` and the named backend is unavailable here, with the reason.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return name
    spec = _spec(name)
    reason = spec.check() if available else None
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} is not available: {reason}")
    return name


def available_backends() -> dict[str, BackendStatus]:
    """Availability of every registered backend here, with the reason when one is unavailable."""
    report = {}
    for spec in _BACKENDS.values():
        reason = spec.check()
        report[spec.name] = BackendStatus(
            name=spec.name,
            available=reason is None,
            reason=reason or "available",
            device_types=spec.devices(),
            summary=spec.summary,
        )
    return report


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype | tuple[torch.dtype, ...] | None = None
) -> tuple[str, ModuleType]:
    """Return ``(name, module)`` of the backend to run for tensors of ``dtype`` (one, or every dtype of a call's
    inputs when they differ) on ``device``.

    Raises:
        ValueError: ``name`` is not ``"auto"`` nor a registered backend.
        BackendUnavailableError: the named backend is unavailable here or cannot take the device or dtype.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    dtypes = () if dtype is None else tuple(dict.fromkeys(dtype if isinstance(dtype, tuple) else (dtype,)))
    if name == "auto":
        chosen = _choose_auto(device, dtypes)
        logger.debug("dpo_kernels: backend='auto' chose %r for device %s", chosen.name, device)
        return chosen.name, importlib.import_module(chosen.module)
    spec = _spec(name)
    reason = spec.check()
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} is not available: {reason}")
    if not spec.runs_on(device.type):
        raise BackendUnavailableError(
            f"backend={name!r} runs on {', '.join(spec.devices())} tensors, but the inputs are on {device}"
        )
    if not spec.takes(dtypes):
        takes = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
        got = next(d for d in dtypes if d not in spec.dtypes)
        raise BackendUnavailableError(f"backend={name!r} takes {takes} inputs, got {got}; use backend='torch'")
    return spec.name, importlib.import_module(spec.module)


def _choose_auto(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> BackendSpec:
    candidates = [
        spec
        for spec in _BACKENDS.values()
        if _matches(spec.auto_devices, device.type)
        and spec.runs_on(device.type)
        and spec.takes(dtypes)
        and spec.check() is None
    ]
    if not candidates:  # unreachable while the torch backend (any device and dtype, always available) is registered
        raise BackendUnavailableError(f"no backend is available for {dtypes} tensors on {device}")
    return min(candidates, key=lambda spec: spec.auto_rank)


def backend_kernels(name: str, purpose: str, *tensors: torch.Tensor | None):
    """The :class:`~dpo_kernels.ops.backend.BackendKernels` of ``backend=name`` for ``tensors`` (on the first one's
    device; ``None`` entries skipped), which the kernels' own input check has accepted.

    Raises:
        ValueError: the backend is the single-process oracle, which has no kernels for ``purpose`` (named in the
            message: "vocab_parallel_group", "torch.compile", ...).
        BackendUnavailableError: as :func:`resolve_backend`.
    """
    given = [t for t in tensors if t is not None]
    chosen, module = resolve_backend(name, given[0].device, tuple(t.dtype for t in given))
    kernels = getattr(module, "KERNELS", None)
    if kernels is None:
        what = (f"cannot run under {purpose} (it is the single-process oracle, without kernels)"
                if purpose == "torch.compile" else f"is the single-process oracle, without kernels for {purpose}")
        raise ValueError(f"backend={chosen!r} {what}; use 'torch', 'cpu', 'cuda', 'triton' or 'auto'")
    kernels.check_inputs(*given)
    return kernels
