"""``TokenStats``: the per-token results every path returns, from the kernels to the losses and the TRL head."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like the labels (``[R, T]`` inside the package, ``[..., T]`` at the API),
    fp32 (fp64 for fp64 inputs), exactly 0 at ignored tokens.

    Attributes:
        logp: the policy's log-probs of the labels; differentiable.
        ref_logp: the reference's (``None`` without a reference); never differentiable.
        kl: ``KL(ref || policy)`` per token (``None`` without a reference); differentiable in the policy.
        logged: ``None``, or the statistics trainers log, computed in the same forward pass and not differentiable:
            ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (bool)
            (:data:`dpo_kernels.ops.linear.contract.LOGGED_OUTPUTS`).
    """

    logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    logged: dict[str, torch.Tensor] | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenStats":
        """Every tensor through ``fn`` (e.g. a reshape), ``None`` kept."""
        logged = None if self.logged is None else {k: fn(v) for k, v in self.logged.items()}
        return TokenStats(fn(self.logp), *(None if t is None else fn(t) for t in (self.ref_logp, self.kl)), logged)

    def public(self):
        """What the public primitives return: ``logp``, or ``(logp, ref_logp, kl)`` with a reference."""
        return self.logp if self.ref_logp is None else (self.logp, self.ref_logp, self.kl)
