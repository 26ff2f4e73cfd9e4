"""Per-token primitives, one module per backend, behind the dispatcher in ``registry``."""

from .common import LinearHead
from .registry import (
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backends_for,
    resolve_backend,
)

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "LinearHead",
    "available_backends",
    "backends_for",
    "resolve_backend",
]
