"""FSDP2 and expert parallelism applied to a model, in pure torch: the device mesh and ``parallelize(model, mesh)``,
which a LightningModule's ``configure_model`` calls under Lightning's ``ModelParallelStrategy``.

The layout follows torchtitan (``parallelize_llama`` / ``apply_fsdp`` for MoE models) on a 2-D mesh of
``W = R * P`` ranks, dimensions ``("expert_replicate", "expert")``:

- every rank reads its own data (all W ranks are data-parallel);
- every :class:`~moe_lightning.nn.layer.MoELayer`'s experts are split over the ``"expert"`` dimension (P ranks hold
  E/P experts each, tokens travel with ``all_to_all_single``) and sharded by FSDP2 over ``"expert_replicate"``;
  their gradients are divided by W, since each expert's gradient already sums the P ranks of its group;
- everything else is sharded by FSDP2 over all W ranks: routers, shared experts and dense FFNs one group per
  module (a probe gathers one layer at a time), attention, norms and embeddings one group per block, then the root;
- the balance loss uses the routed loads summed over all W ranks, so the ranks' mean loss is the loss of the global
  batch.

``P = 1`` is FSDP2 alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_lightning.common import check_positive_int, is_fsdp_module
from moe_lightning.distributed.expert_parallel import shard_experts
from moe_lightning.nn.layer import DenseFFN, MoELayer

__all__ = ["EXPERT_MESH_DIMS", "clip_grad_norm_", "expert_parallel_mesh", "is_parallelized", "parallelize"]

EXPERT_MESH_DIMS = ("expert_replicate", "expert")


def expert_parallel_mesh(device_type: str, expert_parallel_size: int) -> DeviceMesh:
    """The ``(W / P, P)`` mesh of :data:`EXPERT_MESH_DIMS` over the default process group of W ranks."""
    check_positive_int("expert_parallel_size", expert_parallel_size)
    world = dist.get_world_size()
    if world % expert_parallel_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} must divide the world size {world} "
            f"(allowed: divisors of {world})"
        )
    return init_device_mesh(
        device_type, (world // expert_parallel_size, expert_parallel_size), mesh_dim_names=EXPERT_MESH_DIMS
    )


def is_parallelized(model: nn.Module) -> bool:
    """Whether :func:`parallelize` (or another ``fully_shard``) has already been applied to ``model``."""
    return is_fsdp_module(model)


def parallelize(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Apply expert parallelism over ``mesh["expert"]`` and FSDP2 over every rank to ``model``, in place.

    Args:
        model: the network (an ``MLPMoE``, a ``TransformerMoE``, or any module holding ``MoELayer`` blocks); its
            ``blocks`` (if any) become one FSDP2 group each.
        mesh: from :func:`expert_parallel_mesh`; its size is the world size.
        reshard_after_forward: FSDP2's option for the non-root groups (free the gathered weights after forward).

    Every MoE layer needs ``num_experts`` divisible by ``mesh["expert"].size()`` (else a ``ValueError``).
    """
    from torch.distributed.fsdp import fully_shard

    if tuple(mesh.mesh_dim_names or ()) != EXPERT_MESH_DIMS:
        raise ValueError(f"parallelize: mesh dims must be {EXPERT_MESH_DIMS}, got {mesh.mesh_dim_names}")
    world = mesh.size()
    expert_mesh, replicate_mesh = mesh["expert"], mesh["expert_replicate"]
    data_mesh = init_device_mesh(mesh.device_type, (world,), mesh_dim_names=("data",))
    data_group = data_mesh.get_group()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:  # checked for all layers before any is changed
        if layer.num_experts % expert_mesh.size():
            raise ValueError(
                f"num_experts={layer.num_experts} must be divisible by the expert-parallel size {expert_mesh.size()}"
            )
    for layer in layers:
        layer.load_group = data_group
        if expert_mesh.size() == 1:  # one group per layer, so a probe can gather one layer at a time
            fully_shard(layer, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
            continue
        shard_experts(layer, expert_mesh)
        # The router and shared experts are replicated data-parallel weights: sharded over every rank. What is
        # left in the layer's own group is its experts, sharded over the replicas of each expert.
        fully_shard(layer.router, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
        if layer.shared_experts is not None:
            fully_shard(layer.shared_experts, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=replicate_mesh, reshard_after_forward=reshard_after_forward)
        layer.set_gradient_divide_factor(float(world))
        # gloo has no PREMUL_SUM: sum, then divide. Not on a one-rank replica mesh, where FSDP2 skips the
        # reduction and divides its copy by the factor, and a forced sum would divide it a second time.
        if replicate_mesh.size() > 1 and dist.get_backend(replicate_mesh.get_group()) == "gloo":
            layer.set_force_sum_reduction_for_comms(True)
    shared = {id(layer.shared_experts) for layer in layers}
    for ffn in [m for m in model.modules() if isinstance(m, DenseFFN) and id(m) not in shared]:
        # A dense FFN (the matched baseline) is a group of its own, as an MoE layer is, so that a probe gathers it
        # alone; inside its block's group its weights would stay sharded while it is probed.
        fully_shard(ffn, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=data_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=data_mesh, reshard_after_forward=False)
    return model


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters sharded on several device meshes (the experts on the expert
    mesh, the rest on the data mesh), whose DTensor gradients ``clip_grad_norm_`` cannot stack: the norm of each
    mesh's gradients (``get_total_norm``, made whole with ``full_tensor``), then their norm, as torchtitan does
    for expert parallelism. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict[object, list[Tensor]] = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type) if norms else torch.zeros(())
    # clip_grads_with_norm_'s coefficient, applied as a number: a tensor cannot multiply DTensors of two meshes.
    coefficient = float((max_norm / (total + 1e-6)).clamp(max=1.0))
    for grads in by_mesh.values():
        torch._foreach_mul_(grads, coefficient)
    return total
