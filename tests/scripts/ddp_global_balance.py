"""Run by tests/test_balancing.py: ``load_balancing="global_aux_loss"`` on 2 gloo processes of unequal batch sizes
(5 and 11 tokens of one union batch). Each rank saves its loss value, its per-rank Switch loss, and its router
weight gradient of the loss, to ``<out_dir>/rank<r>.pt``; the test averages the gradients as DDP does."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lightning.nn.balancing import load_balance_loss
from moe_lightning.nn.layer import MoEConfig, MoELayer

CONFIG = MoEConfig(dim=8, expert_hidden=8, num_experts=4, top_k=2, load_balancing="global_aux_loss")
SPLIT = (5, 11)


def union_batch() -> torch.Tensor:
    return torch.randn(sum(SPLIT), CONFIG.dim, generator=torch.Generator().manual_seed(3))


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = MoELayer(CONFIG).train()
    x = union_batch().split(SPLIT)[rank]
    _, aux = layer(x)
    aux.load_balance.backward()
    own = load_balance_loss(aux.router.probs.detach(), aux.routed_per_expert)
    result = {"loss": aux.load_balance.detach(), "own": own, "grad": layer.router.weight.grad.clone()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
