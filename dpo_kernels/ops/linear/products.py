"""The head's matrix products: which dtype they are defined in, and how each device computes them.

The dtype rule (MATH.md §6):

- under ``torch.autocast`` for the inputs' device, the product ``h W^T`` is defined in the autocast dtype, as
  ``nn.Linear`` would compute it: both operands are rounded to that dtype (fp64 inputs are left alone, as autocast
  does);
- without autocast, in ``torch.promote_types(hidden.dtype, weight.dtype)``: a bf16 hidden state beside an fp32
  head is multiplied in fp32, exactly, as ``hidden.float() @ weight.T`` would be.

Statistics are fp32 (fp64 for fp64 inputs) and a product is never rounded to a half dtype before it is folded: every
GEMM here writes fp32 (fp64).

How: where the device multiplies half operands into an fp32 result (CUDA's ``torch.mm(..., out_dtype=float32)``,
i.e. cuBLAS on the tensor cores with fp32 accumulation; also the ``meta`` device), half operands go to the GEMM as
they are. Elsewhere (the CPU) operands are converted to fp32 after the rounding, which computes the same products
exactly. fp32 operands on CUDA follow ``torch.backends.cuda.matmul.allow_tf32``, as every ``torch.mm`` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def product_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.T`` is defined in, under the rule of this module's docstring."""
    device_type = hidden.device.type
    if torch.float64 not in (hidden.dtype, weight.dtype) and _autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


@functools.cache
def half_into_float(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this device computes ``torch.mm(a, b, out_dtype=torch.float32)`` for ``dtype`` operands."""
    try:
        a = torch.zeros((1, 1), dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def accumulates_into_float(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` works for an fp32 ``acc`` and ``dtype``
    operands (newer torch releases; older ones require ``acc`` in the operands' dtype)."""
    try:
        a = torch.zeros((1, 1), dtype=dtype, device=device_type)
        acc = torch.zeros((1, 1), dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@dataclass(frozen=True)
class Products:
    """How one head's tiles are multiplied.

    Attributes:
        compute_dtype: the dtype the product is defined in (:func:`product_dtype`).
        operand_dtype: what the GEMMs receive: ``compute_dtype`` where the device multiplies it into fp32 (half on
            CUDA), else the statistics dtype (fp32, or fp64).
        out_dtype: the GEMM output and statistics dtype, fp32 (fp64 for fp64).
    """

    compute_dtype: torch.dtype
    operand_dtype: torch.dtype
    out_dtype: torch.dtype

    @classmethod
    def in_dtype(cls, compute: torch.dtype, device_type: str, out_dtype: torch.dtype) -> "Products":
        """For products in ``compute`` (decided earlier, e.g. under the caller's autocast) on ``device_type``."""
        half_ok = compute in HALF_DTYPES and out_dtype == torch.float32 and half_into_float(device_type, compute)
        return cls(compute_dtype=compute, operand_dtype=compute if half_ok else out_dtype, out_dtype=out_dtype)

    @property
    def operand_bytes(self) -> int:
        return torch.empty((), dtype=self.operand_dtype).element_size()

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a GEMM operand: rounded to the compute dtype (an fp32 head under bf16 autocast is rounded even on
        the CPU, where it is then widened back), then in the operand dtype. No copy when ``t`` has both already."""
        return t.to(self.compute_dtype).to(self.operand_dtype)

    def bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias added to the fp32 logits: rounded to the compute dtype as ``nn.Linear`` would, held in fp32."""
        return None if b is None else b.to(self.compute_dtype).to(self.out_dtype)

    def logits(self, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = h [n, D] @ w[vc, D].T``, an fp32 (fp64) ``[n, vc]`` tile; operands from :meth:`operand`."""
        if h.dtype == self.out_dtype:
            return torch.mm(h, w.T, out=out)
        return torch.mm(h, w.T, out_dtype=self.out_dtype, out=out)

    def accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` for an fp32 (fp64) ``acc``, accumulated in fp32 inside the GEMM."""
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
        elif accumulates_into_float(acc.device.type, a.dtype):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))

    def write(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
        """``out = a @ b`` with fp32 accumulation inside the GEMM and one rounding to ``out``'s dtype, when one GEMM
        can do it; returns ``False`` (nothing written) when it cannot, e.g. half operands into an fp16/bf16 ``out``
        of the other half type."""
        if out.dtype == a.dtype:  # fp32 x fp32 -> fp32, or bf16 x bf16 -> bf16 with fp32 accumulation (cuBLAS)
            torch.mm(a, b, out=out)
            return True
        if out.dtype == self.out_dtype:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            return True
        return False
