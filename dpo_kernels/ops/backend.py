"""What a backend supplies: :class:`BackendKernels`, every kernel in named slots.

Adding a backend is filling the slots in a module (``KERNELS = BackendKernels(...)``) and one row in
:mod:`dpo_kernels.ops.registry`: the from-logits row kernels (:class:`~dpo_kernels.ops.logits_path.LogitsKernels`)
and the linear path's tile kernels (:class:`~dpo_kernels.ops.linear.contract.TileKernels`). Everything above them
is the same for every backend: :mod:`dpo_kernels.ops.logits_path` from logits, :mod:`dpo_kernels.ops.linear` from
hidden states and for vocabulary-parallel slices, :mod:`dpo_kernels.ops.dispatch` choosing between them. The
reference oracle alone has no kernels (autograd through full logits, :mod:`dpo_kernels.ops.reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .linear.contract import TileKernels
from .logits_path import LogitsKernels


@dataclass(frozen=True)
class BackendKernels:
    """Every kernel of one backend. ``check(*tensors)``, when given, raises a clear error for inputs the kernels
    cannot take (the registry's dtype table already refuses them at dispatch; this guards direct use)."""

    logits: LogitsKernels
    tiles: TileKernels
    check: Callable[..., None] | None = None

    def check_inputs(self, *tensors: torch.Tensor | None) -> None:
        if self.check is not None:
            self.check(*(t for t in tensors if t is not None))
