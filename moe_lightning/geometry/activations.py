"""Elementwise activations and their derivatives ``φ'`` in closed form, for the closed-form expert Jacobians and
Jacobian operators (docs/geometry.md §1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp

__all__ = ["ACTIVATIONS", "activation_derivative", "silu_derivative"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_derivative(z: Tensor) -> Tensor:
    # gelu(z) = z Φ(z)  =>  gelu'(z) = Φ(z) + z φ(z), with Φ/φ the standard normal CDF/PDF.
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _gelu_tanh_derivative(z: Tensor) -> Tensor:
    # gelu_tanh(z) = ½ z (1 + tanh u), u = √(2/π)(z + 0.044715 z³)  (Hendrycks & Gimpel 2016, eq. for the tanh form).
    u = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    t = torch.tanh(u)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


def silu_derivative(z: Tensor) -> Tensor:
    """``silu'(z) = σ(z)(1 + z(1 − σ(z)))`` elementwise; the SwiGLU closed forms of
    :mod:`~moe_lightning.geometry.jacobians` and :mod:`~moe_lightning.geometry.operators` share it."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


#: Named activations: ``name -> (φ, φ')``. ReLU uses φ'(0) = 0, as autograd does.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, _gelu_derivative),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_derivative),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
    "silu": (F.silu, silu_derivative),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
}


def activation_derivative(activation: str | Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """``φ'(z)`` elementwise for a named activation, or by forward-mode autograd for any elementwise callable.

    Args:
        activation: a key of :data:`ACTIVATIONS` or an elementwise callable (e.g. ``nn.GELU()``).
        z: pre-activations, any shape.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
        return ACTIVATIONS[activation][1](z)
    if not callable(activation):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
    # For an elementwise φ the JVP with an all-ones tangent is exactly φ'(z) at every entry.
    return jvp(activation, (z,), (torch.ones_like(z),))[1]
