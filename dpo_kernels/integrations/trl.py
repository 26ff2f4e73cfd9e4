"""Run TRL 1.16's own trainers on dpo_kernels: ``patch()`` / ``unpatch()``.

TRL 1.16 computes per-token log-probs for every trainer (DPO, KTO, GRPO, RLOO, SFT, ...) through one function:
``add_fused_lm_head`` makes ``model(..., fused_lm_head=True)`` call ``trl.trainer.utils._ChunkedLogProbFunction``.
``patch()`` replaces that function with :class:`FusedLogProbs`, which computes the log-probs with
:func:`dpo_kernels.linear_token_logprobs` (the backend you choose; gradients flow to hidden states, head weight and
bias) and the fields TRL only logs (entropy, mean logits, top-1 accuracy, log sum p^2) in a no-grad tiled pass. The
trainers, their losses and their metrics are otherwise TRL's own.

    from dpo_kernels.integrations import trl as dk_trl
    dk_trl.patch()            # before building the trainer; dk_trl.unpatch() restores TRL's function
    trainer = DPOTrainer(...)

Entropy is returned for logging: a trainer that backpropagates through it (an entropy bonus) gets a clear error
instead of a silently missing gradient; ``unpatch()`` for such trainers.
"""

from __future__ import annotations

import importlib.metadata

import torch

from ..options import TokenOptions
from ..primitives import linear_token_logprobs
from .vocab_statistics import vocab_statistics

SUPPORTED_TRL = ("1.16",)
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_state: dict[str, object] = {}


def _trl_utils():
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("dpo_kernels.integrations.trl needs TRL: pip install 'trl==1.16.*'") from None
    if ".".join(version.split(".")[:2]) not in SUPPORTED_TRL:
        raise RuntimeError(
            f"dpo_kernels.integrations.trl supports TRL {', '.join(SUPPORTED_TRL)}; found TRL {version}. "
            "Its fused LM head interface differs across minor versions."
        )
    import trl.trainer.utils as utils

    if not hasattr(utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(f"TRL {version} has no trl.trainer.utils._ChunkedLogProbFunction to patch")
    return utils


def patch(*, backend: str = "auto") -> None:
    """Make TRL's fused LM head use dpo_kernels with ``backend``. Idempotent; call before creating the trainer."""
    utils = _trl_utils()
    if "original" not in _state:
        _state["original"] = utils._ChunkedLogProbFunction
    FusedLogProbs.backend = backend
    utils._ChunkedLogProbFunction = FusedLogProbs


def unpatch() -> None:
    """Restore TRL's own chunked log-prob function."""
    if "original" in _state:
        _trl_utils()._ChunkedLogProbFunction = _state.pop("original")


def is_patched() -> bool:
    return "original" in _state


class _LoggingOnly(torch.autograd.Function):
    """Passes a statistic through, attached to the graph, and refuses to differentiate it."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "dpo_kernels.integrations.trl computes the entropy for logging only; this trainer backpropagates through "
            "it. Call dpo_kernels.integrations.trl.unpatch() for trainers with an entropy term in their loss."
        )


class FusedLogProbs:
    """Drop-in for TRL 1.16's ``ChunkedLogProbFunction``: same ``apply`` arguments and 5-tuple result."""

    backend = "auto"

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=_ALL_OUTPUTS):
        opts = TokenOptions(temperature=float(temperature), softcap=final_logit_softcapping,
                            logit_scale=float(logit_scale))
        log_probs = linear_token_logprobs(
            hidden.unsqueeze(0), weight, targets.unsqueeze(0), bias=bias, temperature=opts.temperature,
            softcap=opts.softcap, logit_scale=opts.logit_scale, backend=FusedLogProbs.backend,
        ).squeeze(0)
        wanted = set(outputs) - {"log_probs"}
        stats = vocab_statistics(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                 targets, opts, wanted) if wanted else {}
        entropy = stats.get("entropy")
        if entropy is not None and hidden.requires_grad:
            entropy = _LoggingOnly.apply(entropy, hidden)
        return log_probs, entropy, stats.get("log_sum_sq_probs"), stats.get("mean_logits"), stats.get("is_top1")
