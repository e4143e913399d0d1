"""Helpers every layer of the package shares, written once: config checks, dtype names, observing a module without
changing it, telling an FSDP2-sharded module, warn-once, and network checks. Pure Python and torch: the bottom of
the import graph."""

from moe_lightning.common.checks import check_choice, check_nonnegative, check_positive, check_positive_int
from moe_lightning.common.dtypes import DTYPES, dtype_from_name, dtype_name
from moe_lightning.common.network import hf_offline_mode, hub_reachable, tcp_reachable
from moe_lightning.common.observe import observation, preserved_rng, restored_modes
from moe_lightning.common.sharding import is_fsdp_module
from moe_lightning.common.warn import warn_once

__all__ = [
    "DTYPES",
    "check_choice",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "dtype_from_name",
    "dtype_name",
    "hf_offline_mode",
    "hub_reachable",
    "is_fsdp_module",
    "observation",
    "preserved_rng",
    "restored_modes",
    "tcp_reachable",
    "warn_once",
]
