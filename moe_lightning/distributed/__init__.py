"""Parallelism, pure torch.distributed: expert parallelism (``expert_parallel``: the sharding of a layer's experts
over ranks, the ``all_to_all`` token exchange, the gathering of every expert on one rank), and the device mesh and
FSDP2 x expert-parallel layout of a model (``layout``, ``fsdp``). The Lightning strategy that uses them is
:class:`moe_lightning.lightning.ExpertParallelStrategy`.

The names load on first use::

    from moe_lightning.distributed import expert_parallel_mesh, parallelize
    parallelize(model, expert_parallel_mesh("cuda", expert_parallel_size=2))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.distributed.expert_parallel import (
        ExpertExchange,
        gather_experts,
        plan_exchange,
        shard_experts,
        summed_over,
    )
    from moe_lightning.distributed.fsdp import fsdp_output
    from moe_lightning.distributed.layout import (
        EXPERT_MESH_DIMS,
        clip_grad_norm_,
        expert_parallel_mesh,
        is_parallelized,
        parallelize,
    )

# Public name -> the module that defines it.
_SOURCES = {
    "EXPERT_MESH_DIMS": "layout",
    "ExpertExchange": "expert_parallel",
    "clip_grad_norm_": "layout",
    "expert_parallel_mesh": "layout",
    "fsdp_output": "fsdp",
    "gather_experts": "expert_parallel",
    "is_parallelized": "layout",
    "parallelize": "layout",
    "plan_exchange": "expert_parallel",
    "shard_experts": "expert_parallel",
    "summed_over": "expert_parallel",
}
__all__ = [
    "EXPERT_MESH_DIMS",
    "ExpertExchange",
    "clip_grad_norm_",
    "expert_parallel_mesh",
    "fsdp_output",
    "gather_experts",
    "is_parallelized",
    "parallelize",
    "plan_exchange",
    "shard_experts",
    "summed_over",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
