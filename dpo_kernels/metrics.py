"""Logged metrics read from the device when they are looked at, not inside the fused call that made them.

A fused call queues its kernels and returns; converting its metrics to floats there would wait for all of them (a
host sync per call on a GPU, beside the call's one host read of its labels, :mod:`dpo_kernels.host_read`).
:class:`LazyMetrics` holds them as 0-dim tensors and converts every pending value in one device-to-host copy on the
first read of a value, typically when a trainer logs them after the backward has been queued.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch


class LazyMetrics(MutableMapping):
    """``name -> float``, in insertion order. A value set as a tensor (0-dim, or one element) stays on its device
    until a value is read; the first read converts all pending tensors at once (``torch.stack(...).tolist()``, one
    copy per device). Keys and ``len`` need no read. Equal to a ``dict`` with the same floats."""

    def __init__(self, values: dict | None = None) -> None:
        self._values: dict[str, float | torch.Tensor] = {}
        self.update(values or {})

    def __setitem__(self, name: str, value) -> None:
        self._values[name] = value.detach().reshape(()) if isinstance(value, torch.Tensor) else float(value)

    def __getitem__(self, name: str) -> float:
        value = self._values[name]
        if isinstance(value, torch.Tensor):
            self._resolve()
            value = self._values[name]
        return value

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LazyMetrics({dict(self.items())!r})"

    def _resolve(self) -> None:
        pending: dict[torch.device, list[str]] = {}
        for name, value in self._values.items():
            if isinstance(value, torch.Tensor):
                pending.setdefault(value.device, []).append(name)
        for names in pending.values():
            floats = torch.stack([self._values[n].to(torch.float64) for n in names]).tolist()  # the one read
            self._values.update(zip(names, floats, strict=True))
