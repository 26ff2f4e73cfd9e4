"""Timing and memory measurement for the demo, the self-check and the benchmark scripts."""

from __future__ import annotations

import ctypes
import gc
import os
import re

import torch

_CLEAR_REFS = "/proc/self/clear_refs"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _trim_malloc_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc), else nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block, measured: peak allocator bytes on CUDA, growth of the resident set on Linux
    CPUs (the kernel's peak mark, ``VmHWM``, reset on entry). After the block, ``base_mib``, ``peak_mib`` and
    ``mib = peak_mib - base_mib`` are set, or stay ``None`` where neither is available.

    On the CPU, memory an earlier computation freed can stay resident in malloc's heap and be reused unseen: it is
    handed back on entry, so that the resident set counts live memory only and its growth is the block's need."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.base_mib = self.peak_mib = self.mib = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / 2**20
        elif os.path.exists(_CLEAR_REFS):
            gc.collect()
            _trim_malloc_heap()
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.base_mib = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.base_mib is not None:
            self.peak_mib = _status_kib("VmHWM") / 1024
        if self.peak_mib is not None:
            self.mib = self.peak_mib - self.base_mib
