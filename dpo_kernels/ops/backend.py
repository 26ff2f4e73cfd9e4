"""What a backend supplies: :class:`BackendKernels`, every kernel in named slots.

Adding a backend is filling the slots in a module (``KERNELS = BackendKernels(...)``) and one row in
:mod:`dpo_kernels.ops.registry`: the from-logits row kernels (:class:`~dpo_kernels.ops.logits_path.LogitsKernels`)
and the linear path's tile kernels (:class:`~dpo_kernels.ops.linear.contract.TileKernels`). The drivers do the
rest, the same for every backend: :mod:`dpo_kernels.ops.logits_path` from logits, :mod:`dpo_kernels.ops.linear.
driver` from hidden states, vocabulary-parallel slices and the compiled path over the tile kernels. The reference
oracle alone is not kernels: its module has the three entry points below as plain functions (autograd through
full logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from ..options import TokenOptions
from . import logits_path
from .common import LinearHead
from .linear import driver
from .linear.contract import TileKernels
from .logits_path import LogitsKernels


@dataclass(frozen=True)
class BackendKernels:
    """Every kernel of one backend. ``check(*tensors)``, when given, raises a clear error for inputs the kernels
    cannot take (the registry's dtype table already refuses them at dispatch; this guards direct use)."""

    logits: LogitsKernels
    tiles: TileKernels
    check: Callable[..., None] | None = None

    def _check(self, *tensors: torch.Tensor | None) -> None:
        if self.check is not None:
            self.check(*(t for t in tensors if t is not None))

    def token_logprobs(self, logits: torch.Tensor, labels: torch.Tensor, opts: TokenOptions) -> torch.Tensor:
        """``logits [R, T, V]``, ``labels [R, T]`` -> ``logp [R, T]``."""
        self._check(logits)
        return logits_path.token_stats(logits, None, labels, opts, self.logits)

    def token_logprobs_and_kl(self, logits, ref_logits, labels, opts: TokenOptions):
        """-> ``(logp, ref_logp, kl)``, each ``[R, T]``; ``ref_logits`` receives no gradient."""
        self._check(logits, ref_logits)
        return logits_path.token_stats(logits, ref_logits, labels, opts, self.logits)

    def linear_token_stats(self, policy: LinearHead, ref: LinearHead | None, labels: torch.Tensor,
                           opts: TokenOptions, logging: bool = False, head_context=None, kept_count: int | None = None):
        """The linear path on this backend's tile kernels (see :func:`driver.linear_token_stats`)."""
        heads = (policy,) if ref is None else (policy, ref)
        self._check(*(t for head in heads for t in (head.hidden, head.weight, head.bias)))
        return driver.linear_token_stats(policy, ref, labels, opts, self.tiles, logging, head_context=head_context,
                                         kept_count=kept_count)


def entry_points(module: ModuleType):
    """The object whose ``token_logprobs``, ``token_logprobs_and_kl`` and ``linear_token_stats`` run a backend: its
    :class:`BackendKernels`, or the oracle's module itself."""
    return getattr(module, "KERNELS", module)


def tile_kernels_of(module: ModuleType) -> TileKernels | None:
    """A backend's tile kernels; ``None`` for the oracle, which has none."""
    kernels = getattr(module, "KERNELS", None)
    return None if kernels is None else kernels.tiles

