"""Floating-point dtypes by name, as configs and command lines spell them."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moe_lightning.common.checks import check_choice

DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_from_name(field: str, name: str, allowed: Iterable[str] = tuple(DTYPES)) -> torch.dtype:
    """The dtype called ``name``, which must be among ``allowed`` (a ``ValueError`` naming ``field`` otherwise)."""
    check_choice(field, name, allowed)
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")
