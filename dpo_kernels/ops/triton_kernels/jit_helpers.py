"""Triton device functions shared by the kernels: the logit post-processing of MATH.md §1 and its slope, and
the online fold of a block of reference logits for the KL.

Which steps apply is chosen by constexpr flags (``HAS_SCALE``, ``HAS_SOFTCAP``, ``HAS_TEMPERATURE``), so a kernel
compiled without a softcap contains no tanh at all.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: exact at both tails, ~1e-7 absolute near 0, available in the interpreter too.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def load_biased(row_ptr, bias_ptr, cols, inside, HAS_BIAS: tl.constexpr):
    """A block of a tile's raw logits ``x + bias`` (0 outside the row), in fp32."""
    x = tl.load(row_ptr + cols, mask=inside, other=0.0)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=inside, other=0.0)
    return x


@triton.jit
def transform(x, logit_scale, softcap, inv_temperature,
              HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """``z = (softcap * tanh(logit_scale * x / softcap)) / temperature``, each step only when its flag is set."""
    z = x
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    if HAS_TEMPERATURE:
        z = z * inv_temperature
    return z


@triton.jit
def transform_and_slope(x, logit_scale, softcap, inv_temperature,
                        HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """``(z, dz/dx)`` of :func:`transform` with one tanh: the gradient kernels need both, and ``dL/dx = dL/dz *
    dz/dx``; a second tanh for the slope would cost one more transcendental per logit."""
    z = x
    slope = 1.0
    if HAS_SCALE:
        z = z * logit_scale
        slope = logit_scale
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        z = softcap * t
        slope = slope * (1.0 - t * t)
    if HAS_TEMPERATURE:
        z = z * inv_temperature
        slope = slope * inv_temperature
    return z, slope


# The running maximum's start: the lowest finite float, not -inf, so that a row whose first logits are all -inf
# (probability 0) computes exp(-inf - LOWEST) = 0 instead of exp(-inf - -inf) = NaN, at no cost in the loop; a row of
# nothing but -inf then ends with m = LOWEST, s = 0 and lse = -inf.
LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def finish_lse(m, s):
    """``m + log(s)``, NaN when the row held NaN or +inf (``m`` NaN or +inf): the one rule of MATH.md §1 for
    non-finite logits, also in ``csrc/transform.h`` and :func:`dpo_kernels.ops.linear.contract.finish_lse`."""
    return tl.where((m != m) | (m == float("inf")), float("nan"), m + tl.log(s))


@triton.jit
def fold_reference_block(z, zr, inside, m_r, s_r, w):
    """Fold one block of reference logits ``zr`` (beside the policy's ``z``; lanes outside the row masked by
    ``inside``) into the reference's running max ``m_r`` (a scalar) and the per-lane partial sums ``s_r`` of
    ``e^{zr - m_r}`` and ``w`` of ``e^{zr - m_r} (zr - z)`` (``BLOCK``-wide vectors, summed once after the row, so a
    block costs one cross-warp reduction, the max), rescaled when the max moves. Returns the new ``(m_r, s_r, w)``."""
    log_ratio = zr - z  # before padding lanes become -inf, so no inf - inf is ever formed
    zr = tl.where(inside, zr, -float("inf"))
    m_r_new = tl.maximum(m_r, tl.max(zr, axis=0))
    rescale = tl.exp(m_r - m_r_new)
    e_r = tl.exp(zr - m_r_new)
    s_r = s_r * rescale + e_r
    # an underflowed reference probability contributes exactly 0, even against a -inf policy logit
    w = w * rescale + tl.where(e_r > 0, e_r * log_ratio, 0.0)
    return m_r_new, s_r, w
