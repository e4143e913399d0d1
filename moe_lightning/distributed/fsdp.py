"""What a module's forward does for FSDP2 to keep its hooks."""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.common import is_fsdp_module

__all__ = ["fsdp_output"]


def fsdp_output(module: nn.Module, y: Tensor) -> Tensor:
    """``y``, in its own storage where ``module`` is an FSDP2 group and ``y`` a view of another tensor.

    FSDP2 registers its pre-backward hook (the all-gather of the group's weights for backward) on the output, and an
    in-place op on a view of another tensor would drop it; an output in its own storage keeps it whatever the caller
    does (and FSDP2 warns on every step otherwise).
    """
    if y._base is not None and is_fsdp_module(module):
        return y.clone()
    return y
