"""Telling a module that FSDP2 sharded from one it did not, without importing FSDP where nothing is sharded."""

from __future__ import annotations

from torch import nn


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) has been applied to ``module`` (its class is then a subclass of FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
