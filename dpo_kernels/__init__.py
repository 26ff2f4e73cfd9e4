"""dpo_kernels: fused kernels for preference optimisation (DPO and its family, TDPO, intermediate-layer DPO, sDPO).

Per-token log-probs, per-token KL and the losses are computed without materialising a full-vocabulary tensor. See
``MATH.md`` for the math every backend implements and ``python -m dpo_kernels`` for a backend report.
"""

from .dpo import DPOLossConfig, DPOLossOutput, FusedDPOLoss, PreferenceInputs, compute_dpo_loss, fused_dpo_loss
from .intermediate import intermediate_dpo_loss
from .kto import KTOLossOutput, fused_kto_loss
from .losses import OBJECTIVES
from .ops.common import LinearHead
from .ops.linear.eager import keep_cpu_tile_buffers
from .ops.registry import BackendStatus, BackendUnavailableError, available_backends
from .options import TokenOptions
from .primitives import linear_token_logprobs, linear_token_logprobs_and_kl, token_logprobs, token_logprobs_and_kl

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "BackendStatus",
    "BackendUnavailableError",
    "DPOLossConfig",
    "DPOLossOutput",
    "FusedDPOLoss",
    "KTOLossOutput",
    "LinearHead",
    "PreferenceInputs",
    "TokenOptions",
    "available_backends",
    "compute_dpo_loss",
    "fused_dpo_loss",
    "fused_kto_loss",
    "intermediate_dpo_loss",
    "keep_cpu_tile_buffers",
    "linear_token_logprobs",
    "linear_token_logprobs_and_kl",
    "token_logprobs",
    "token_logprobs_and_kl",
]
