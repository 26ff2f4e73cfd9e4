"""Logged metrics read from the device when they are first looked at, not inside the fused call that made them.

A fused call queues its kernels and returns; converting its metrics to floats there would wait for all of them (a
host sync per call on a GPU, beside the call's one host read of its labels, :mod:`dpo_kernels.host_read`). The call
keeps them as 0-dim tensors in a :class:`PendingMetrics`; the first look at ``DPOLossOutput.metrics`` converts all of
them in one device-to-host copy per device (typically when a trainer logs them, after the backward was queued) and
hands out a plain ``dict[str, float]``, which ``json``, loggers and ``wandb.log`` take as it is.
"""

from __future__ import annotations

import torch


class PendingMetrics:
    """``name -> 0-dim tensor or float`` not yet read, in insertion order; :meth:`read` turns them into a plain
    ``dict[str, float]`` once (``torch.stack(...).tolist()``: one copy per device) and returns that same dict after."""

    __slots__ = ("_values", "_read")

    def __init__(self, values: dict | None = None) -> None:
        self._values: dict[str, float | torch.Tensor] = {}
        self._read: dict[str, float] | None = None
        self.add(values or {})

    def add(self, values: dict) -> None:
        """Add (or replace) values: tensors of one element stay on their device until :meth:`read`."""
        for name, value in values.items():
            self._values[name] = value.detach().reshape(()) if isinstance(value, torch.Tensor) else float(value)
        if self._read is not None:  # added after a read: read again on the next look
            self._read = None

    def read(self) -> dict[str, float]:
        if self._read is None:
            pending: dict[torch.device, list[str]] = {}
            for name, value in self._values.items():
                if isinstance(value, torch.Tensor):
                    pending.setdefault(value.device, []).append(name)
            for names in pending.values():
                floats = torch.stack([self._values[n].to(torch.float64) for n in names]).tolist()  # the one read
                self._values.update(zip(names, floats, strict=True))
            self._read = dict(self._values)
        return self._read

    def __repr__(self) -> str:
        return f"PendingMetrics({list(self._values)})"
