"""``dpo_kernels.timing.PeakMemory`` on the CPU: the growth of the resident set over a block, counting memory that an
earlier computation freed and the block reuses (glibc keeps such pages resident in its heap; without handing them
back first, this block read 4 MiB instead of 256 MiB)."""

from __future__ import annotations

import os

import pytest
import torch

from dpo_kernels.timing import PeakMemory

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS mark")


def _touch_256_mib() -> float:
    tensors = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, every page written
    return sum(float(t[0]) for t in tensors)


def test_peak_memory_counts_reused_freed_memory():
    for _ in range(3):  # the same allocations made and freed before: malloc's heap now holds them
        _touch_256_mib()
    with PeakMemory("cpu") as memory:
        _touch_256_mib()
    assert 250 <= memory.mib <= 400, memory.mib
    assert memory.peak_mib - memory.base_mib == memory.mib


def test_peak_memory_of_a_block_that_allocates_nothing_is_small():
    with PeakMemory("cpu") as memory:
        torch.zeros(16).sum()
    assert 0 <= memory.mib < 20, memory.mib
