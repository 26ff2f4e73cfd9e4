"""Triton device functions shared by the kernels: the logit post-processing of FORMULAS.md §1 and its derivative.

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
def transform_grad(x, grad_z, logit_scale, softcap, inv_temperature,
                   HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """``dL/dx`` from ``dL/dz`` for raw logits ``x``."""
    g = grad_z
    if HAS_TEMPERATURE:
        g = g * inv_temperature
    if HAS_SOFTCAP:
        t = tanh(x * logit_scale / softcap) if HAS_SCALE else tanh(x / softcap)
        g = g * (1.0 - t * t)
    if HAS_SCALE:
        g = g * logit_scale
    return g
