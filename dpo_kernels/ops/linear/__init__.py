"""The linear path (hidden states x output head), one design for every backend.

- ``contract.py``: what a backend supplies, two fused tile kernels (``fold``: a logits tile into per-token online
  statistics; ``grad``: a logits tile into ``dZ`` in the GEMM operand dtype).
- ``plan.py``: tile sizes from one memory budget (``tile_budget_mb``) and the eager schedule's budget.
- ``products.py``: the matrix products: half operands as given with fp32 output where the device has it (tensor
  cores on CUDA), exact fp32 products elsewhere; the dtype rule under autocast and for mixed inputs.
- ``kept.py``: the tokens that are not ignored, gathered once.
- ``sources.py``: the tile-source protocol and its three sources (a GEMM per tile, tiles kept from the forward,
  given logits), each owning its scratch.
- ``loop.py``: the one tile loop (forward token-major, backward vocabulary-major) and the recompute passes.
- ``recompute.py``: the recompute schedule as one custom op (eager and compiled), and the one Function for process
  groups and head-gathering contexts.
- ``eager.py``: the eager schedule of the fused objectives: its byte plan, its store and its Function.

The ``torch``, ``cpu``, ``cuda`` and ``triton`` backends differ only in their :class:`TileKernels`.
"""

from .contract import LogitsTile, TileKernels

__all__ = ["LogitsTile", "TileKernels"]
