"""The backend table and the dispatcher.

A backend is a module exposing the four primitives with one signature each (see ``reference.py``):
``token_logprobs``, ``token_logprobs_and_kl``, ``linear_token_logprobs``, ``linear_token_logprobs_and_kl``, all on
``[R, T, ...]`` inputs. Adding a backend is one ``BackendSpec`` row in ``_BACKENDS``: its module, the device types
it runs on, how it checks its own availability, and its rank for ``backend="auto"``.

``backend="auto"`` picks the available backend with the best rank for the input's device type and logs the choice
at debug level. Naming a backend explicitly never falls back: an unavailable one raises ``BackendUnavailableError``
with the reason.
"""

from __future__ import annotations

import importlib
import logging
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
        module: import path of the module implementing the four primitives.
        device_types: ``torch.device.type`` values it runs on, or ``("*",)`` for any.
        auto_rank: lower is preferred by ``backend="auto"``; ``None`` means auto never picks it.
        check: returns ``None`` when usable here, else the reason it is not.
        summary: one line for the report.
    """

    name: str
    module: str
    device_types: tuple[str, ...]
    auto_rank: int | None
    check: Callable[[], str | None]
    summary: str

    def runs_on(self, device_type: str) -> bool:
        return ANY_DEVICE in self.device_types or device_type in self.device_types


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend, as reported by :func:`available_backends`."""

    name: str
    available: bool
    reason: str
    device_types: tuple[str, ...]
    summary: str


def _always() -> str | None:
    return None


_BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="reference",
            module="dpo_kernels.ops.reference",
            device_types=(ANY_DEVICE,),
            auto_rank=None,
            check=_always,
            summary="naive PyTorch oracle; materialises [N, V] (tests and tiny inputs only)",
        ),
        BackendSpec(
            name="torch",
            module="dpo_kernels.ops.torch_chunked",
            device_types=(ANY_DEVICE,),
            auto_rank=100,
            check=_always,
            summary="chunked PyTorch, memory-bounded, any device (the fallback)",
        ),
    )
}


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, in table order."""
    return tuple(_BACKENDS)


def _spec(name: str) -> BackendSpec:
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"backend must be one of {known}; got {name!r}") from None


def available_backends() -> dict[str, BackendStatus]:
    """Availability of every registered backend here, with the reason when one is unavailable."""
    report = {}
    for spec in _BACKENDS.values():
        reason = spec.check()
        report[spec.name] = BackendStatus(
            name=spec.name,
            available=reason is None,
            reason=reason or "available",
            device_types=spec.device_types,
            summary=spec.summary,
        )
    return report


def resolve_backend(name: str, device: torch.device) -> tuple[str, ModuleType]:
    """Return ``(name, module)`` of the backend to run for tensors on ``device``.

    Raises:
        ValueError: ``name`` is not ``"auto"`` nor a registered backend.
        BackendUnavailableError: the named backend is unavailable here or does not run on ``device``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        chosen = _choose_auto(device)
        logger.debug("dpo_kernels: backend='auto' chose %r for device %s", chosen.name, device)
        return chosen.name, importlib.import_module(chosen.module)
    spec = _spec(name)
    reason = spec.check()
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} is not available: {reason}")
    if not spec.runs_on(device.type):
        raise BackendUnavailableError(
            f"backend={name!r} runs on {', '.join(spec.device_types)} tensors, but the inputs are on {device}"
        )
    return spec.name, importlib.import_module(spec.module)


def _choose_auto(device: torch.device) -> BackendSpec:
    candidates = [
        spec
        for spec in _BACKENDS.values()
        if spec.auto_rank is not None and spec.runs_on(device.type) and spec.check() is None
    ]
    if not candidates:  # unreachable while the torch backend (any device, always available) is registered
        raise BackendUnavailableError(f"no backend is available for device {device}")
    return min(candidates, key=lambda spec: spec.auto_rank)
