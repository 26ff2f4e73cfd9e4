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

No slow path without a word: the policy chosen is logged once per device and dtypes (``dpo_kernels`` logger, info);
on an accelerator a failed capability probe, or a large product promoted to fp32 by mixed dtypes outside autocast,
warns once (:class:`SlowProductsWarning`) with the cost and the fix. The probes catch only failures that mean "not
supported" and raise anything else.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections.abc import Callable
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


class SlowProductsWarning(UserWarning):
    """The head's products run as fp32 x fp32 on an accelerator where half operands were expected (or asked for by
    the inputs' dtypes): on an H100 the FMA units give about 45 TFLOP/s against the tensor cores' ~790."""


_log = logging.getLogger("dpo_kernels")

# What a capability probe may mean by failing: the operation does not exist for this device, dtype or torch release.
# Anything else (a sticky CUDA error from earlier work, an out-of-memory) is not an answer about capability and is
# raised, so that it is neither hidden nor cached as "unsupported".
# torch 2.8-2.9 refuse an fp32 accumulator beside half operands with "... must have the same dtype ...".
_UNSUPPORTED_MESSAGES = re.compile(r"not (be )?supported|unsupported|not implemented|only supported|out_dtype|"
                                   r"could not run|accumulation|same dtype", re.IGNORECASE)


def _capability(probe: Callable[[], object]) -> tuple[bool, str]:
    """``(True, "")`` when ``probe`` runs, ``(False, why)`` when it fails in a way that means "not supported"."""
    try:
        probe()
        return True, ""
    except (TypeError, NotImplementedError) as err:
        return False, _first_line(err)
    except RuntimeError as err:
        if _UNSUPPORTED_MESSAGES.search(str(err)):
            return False, _first_line(err)
        raise


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@functools.cache
def half_into_float(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this device computes ``torch.mm(a, b, out_dtype=torch.float32)`` for ``dtype`` operands. On an
    accelerator a "no" is warned about once (:class:`SlowProductsWarning`): every product of this dtype then runs
    in fp32."""
    def probe():
        a = torch.zeros((1, 1), dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)

    ok, why = _capability(probe)
    if not ok and device_type not in _WIDENING_DEVICES:
        warnings.warn(
            f"dpo_kernels: torch.mm(..., out_dtype=torch.float32) with {dtype} operands failed on {device_type} "
            f"({why}), so every product of the fused head in {dtype} runs as fp32 x fp32 instead of on the tensor "
            f"cores: about 15x slower at a Llama-3 head on an H100. Fix: torch >= 2.8 (half operands with an fp32 "
            "output), and leave torch.backends.cuda.matmul.allow_fp16_accumulation off for fp16.",
            SlowProductsWarning, stacklevel=2)
    return ok


@functools.cache
def accumulates_into_float(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` works for an fp32 ``acc`` and ``dtype``
    operands (newer torch releases; older ones require ``acc`` in the operands' dtype). A "no" costs an fp32
    temporary per accumulation, not fp32 operands, so it is only logged."""
    def probe():
        a = torch.zeros((1, 1), dtype=dtype, device=device_type)
        acc = torch.zeros((1, 1), dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)

    ok, why = _capability(probe)
    if not ok:
        _log.debug("dpo_kernels: fp32 accumulation into an fp32 buffer is unavailable for %s on %s (%s): each "
                   "accumulation goes through an fp32 temporary", dtype, device_type, why)
    return ok


@functools.cache
def batches_into_float(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.baddbmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates ``dtype`` operands into an fp32
    ``acc`` of several matrices (:meth:`Products.accumulate_batched`). A "no" (older torch releases; the ``meta``
    device of torch 2.13, whose decomposition of the overload fails) only means the backward's ``dH`` products run
    one chunk at a time, as they did before, so it is only logged. (No value is read back: no host sync.)"""
    def probe():
        a = torch.zeros((1, 1, 1), dtype=dtype, device=device_type)
        acc = torch.zeros((1, 1, 1), dtype=torch.float32, device=device_type)
        torch.baddbmm(acc, a, a, out_dtype=torch.float32, out=acc)

    ok, why = _capability(probe)
    if not ok:
        _log.debug("dpo_kernels: batched fp32 accumulation is unavailable for %s on %s (%s): the backward's dH "
                   "products run one vocabulary chunk at a time", dtype, device_type, why)
    return ok


# Devices whose GEMMs take the statistics dtype anyway (no half operands with an fp32 output, by design): the CPU,
# whose products are computed exactly by widening the rounded operands.
_WIDENING_DEVICES = ("cpu",)

# Above this many multiply-adds (n x D x V) of one head, a promotion to fp32 products on an accelerator is warned
# about: 2**30 is about 0.1 ms of H100 tensor-core time at bf16 and ~2 ms at fp32.
SLOW_PRODUCTS_WARN_MACS = 2**30


def report_products(products: "Products", hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Log the product policy once per device and dtypes, and on an accelerator warn once when a large product runs
    in fp32 although an input is in a half dtype outside autocast (``nn.Linear`` would refuse the mix; TRL multiplies
    in the hidden states' dtype)."""
    device_type = hidden.device.type
    _log_policy(device_type, hidden.dtype, weight.dtype, products)
    if device_type in _WIDENING_DEVICES or products.operand_dtype in HALF_DTYPES:
        return
    halves = {hidden.dtype, weight.dtype} & set(HALF_DTYPES)
    macs = hidden.numel() * weight.shape[0]
    if halves and products.compute_dtype == torch.float32 and macs >= SLOW_PRODUCTS_WARN_MACS:
        _warn_promotion(device_type, hidden.dtype, weight.dtype)


@functools.cache
def _log_policy(device_type: str, hidden_dtype: torch.dtype, weight_dtype: torch.dtype, products: "Products") -> None:
    _log.info("dpo_kernels: on %s, hidden %s x head %s: products defined in %s, GEMM operands %s, output %s",
              device_type, hidden_dtype, weight_dtype, products.compute_dtype, products.operand_dtype,
              products.out_dtype)


@functools.cache
def _warn_promotion(device_type: str, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    warnings.warn(
        f"dpo_kernels: hidden states in {hidden_dtype} beside a head in {weight_dtype} outside torch.autocast are "
        f"multiplied in fp32 on {device_type} (exactly, as hidden.float() @ weight.T), on the FMA units: about 15x "
        "slower than bf16 tensor cores at a Llama-3 head. Fix: run the step under torch.autocast(device_type, "
        "dtype=torch.bfloat16) (TRL's bf16=True does), or give both the same dtype.",
        SlowProductsWarning, stacklevel=3)


_REDUCED_PRECISION_FLAGS = {torch.bfloat16: "allow_bf16_reduced_precision_reduction",
                            torch.float16: "allow_fp16_reduced_precision_reduction"}


@contextlib.contextmanager
def single_rounding(out_dtype: torch.dtype):
    """A half-output GEMM rounded once from fp32: PyTorch's default lets cuBLAS reduce split-K partial sums in the
    half dtype (``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``); inside this block the
    flag is off, so partials are summed in fp32 and only the result is rounded. No fp32 ``[vc, D]`` temporary is
    needed. Other dtypes, and devices without cuBLAS, are unaffected."""
    name = _REDUCED_PRECISION_FLAGS.get(out_dtype)
    if name is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, name)
    setattr(matmul, name, False)
    try:
        yield
    finally:
        setattr(matmul, name, before)


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

    def converts(self, weight: torch.Tensor) -> bool:
        """Whether :meth:`operand` copies ``weight`` (it is not already in the compute and the operand dtype): the
        one rule for a head converted once for a call (``sources.operand_head``, the eager schedule's budget)."""
        return not (weight.dtype == self.operand_dtype and weight.dtype == self.compute_dtype)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a GEMM operand: rounded to the compute dtype (an fp32 head under bf16 autocast is rounded even on
        the CPU, where it is then widened back), then in the operand dtype. No copy when ``t`` has both already."""
        return t.to(self.compute_dtype).to(self.operand_dtype)

    def converted_bytes(self, weight: torch.Tensor) -> int:
        """Bytes of ``weight`` as GEMM operands where it is converted for them (:meth:`converts`), else 0."""
        return weight.numel() * self.operand_bytes if self.converts(weight) else 0

    def operand_into(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`operand` written into ``out`` (of the operand dtype and ``t``'s shape): one pass where the compute
        and the operand dtypes agree."""
        return out.copy_(t if self.compute_dtype == self.operand_dtype else t.to(self.compute_dtype))

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

    def batches(self, device_type: str) -> bool:
        """Whether :meth:`accumulate_batched` is one GEMM launch here (fp32 / fp64 operands, or half operands where
        :func:`batches_into_float` holds)."""
        return self.operand_dtype == self.out_dtype or batches_into_float(device_type, self.operand_dtype)

    def accumulate_batched(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fresh: bool = False) -> None:
        """``acc[k] += a[k] @ b[k]`` for an fp32 (fp64) ``acc [B, m, n]``, one batched GEMM accumulating in fp32
        (where :meth:`batches`); ``fresh``: ``acc = a @ b`` instead (what ``acc`` held is never read)."""
        if a.dtype == acc.dtype:
            torch.bmm(a, b, out=acc) if fresh else acc.baddbmm_(a, b)
        else:
            torch.baddbmm(acc, a, b, out_dtype=acc.dtype, beta=0 if fresh else 1, out=acc)

    def write(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
        """``out = a @ b`` with fp32 accumulation inside the GEMM and one rounding to ``out``'s dtype (a half ``out``
        under :func:`single_rounding`), when one GEMM can do it; returns ``False`` (nothing written) when it cannot,
        e.g. half operands into an fp16/bf16 ``out`` of the other half type."""
        if out.dtype == a.dtype:  # fp32 x fp32 -> fp32, or bf16 x bf16 -> bf16 with fp32 accumulation (cuBLAS)
            with single_rounding(out.dtype):
                torch.mm(a, b, out=out)
            return True
        if out.dtype == self.out_dtype:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            return True
        return False


def products_now(hidden: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> Products:
    """The :class:`Products` of a call made now (under the caller's autocast state), for planning before it."""
    return Products.in_dtype(product_dtype(hidden, weight), hidden.device.type, out_dtype)


def converted_operand_bytes(hidden: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> int:
    """Bytes of ``weight`` converted to the GEMM operands of a call made now, 0 when it is its own operand
    (:meth:`Products.converts`)."""
    return products_now(hidden, weight, out_dtype).converted_bytes(weight)
