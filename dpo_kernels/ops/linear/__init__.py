"""The linear path (hidden states x output head), one design for every backend.

- ``contract.py``: what a backend supplies, two fused tile kernels (``fold``: a logits tile into per-token online
  statistics; ``grad``: a logits tile into ``dZ`` in the GEMM operand dtype).
- ``plan.py``: tile sizes from one memory budget (``tile_budget_mb``).
- ``products.py``: the matrix products: half operands as given with fp32 output where the device has it (tensor
  cores on CUDA), exact fp32 products elsewhere; the dtype rule under autocast and for mixed inputs.
- ``driver.py``: the one tile loop (forward token-major, backward vocabulary-major) and the one autograd function,
  with an optional reference head.

The ``torch``, ``cpu``, ``cuda`` and ``triton`` backends differ only in their :class:`TileKernels`.
"""

from .contract import LogitsTile, TileKernels

__all__ = ["LogitsTile", "TileKernels"]
