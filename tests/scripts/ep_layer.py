"""Used by ep_training.py on 2 and 4 ranks: an MoELayer with expert parallelism over the gloo world against the same
layer in one process on the union of the ranks' tokens, forward and backward (float32), for top-k and soft routing,
every sparse dispatch path, and an expert no token is routed to."""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_lightning.common import is_fsdp_module
from moe_lightning.distributed.expert_parallel import shard_experts
from moe_lightning.distributed.layout import expert_parallel_mesh, parallelize
from moe_lightning.nn.layer import MoEConfig, MoELayer

TOKENS_PER_RANK, DIM = 12, 16
CASES = [  # (name, routing, dispatch, activation, silent expert)
    ("topk_sorted", "topk", "sorted", "gelu", False),
    ("topk_grouped", "topk", "grouped", "swiglu", False),
    ("topk_loop", "topk", "loop", "gelu", False),
    ("topk_empty_expert", "topk", "sorted", "gelu", True),
    ("soft_sorted", "soft", "auto", "gelu", False),
    ("soft_grouped", "soft", "grouped", "swiglu", False),
]


def build(routing: str, dispatch: str, activation: str, silent: bool) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(
        dim=DIM, expert_hidden=8, num_experts=8, top_k=2, routing=routing, dispatch=dispatch, activation=activation
    )
    layer = MoELayer(config)
    if silent:  # expert 5 scores below -1e3 on every token (their first feature is >= 1): top-2 never picks it
        with torch.no_grad():
            layer.router.weight[5] = 0.0
            layer.router.weight[5, 0] = -1e3
    return layer


def run(layer: MoELayer, x, grad_out, scale: float):
    """Output, and the gradients of <y, grad_out> + scale * load_balance w.r.t. x and the weights."""
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    ((y * grad_out).sum() + scale * aux.load_balance).backward()
    grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux


def check_layer(rank: int, world: int) -> dict:
    """Every case's largest relative differences to one process (the worst rank's), on every rank."""
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * TOKENS_PER_RANK, DIM, generator=gen)
    x_all[:, 0] = x_all[:, 0].abs() + 1.0
    g_all = torch.randn(world * TOKENS_PER_RANK, DIM, generator=gen)
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    result = {}
    for name, routing, dispatch, activation, silent in CASES:
        reference = build(routing, dispatch, activation, silent)
        y_ref, gx_ref, grads_ref, aux_ref = run(reference, x_all, g_all, 1.0)
        layer = copy.deepcopy(reference)
        layer.zero_grad(set_to_none=True)
        shard_experts(layer, mesh)
        # Each rank's loss carries 1/P of the balance loss: their sum is the one-process loss.
        y, gx, grads, aux = run(layer, x_all[rows], g_all[rows], 1.0 / world)
        router_grad = grads["router.weight"].clone()
        dist.all_reduce(router_grad)  # what data parallelism sums
        local = slice(layer.local_experts.start, layer.local_experts.stop)
        mean_balance = aux.load_balance.detach() / world
        dist.all_reduce(mean_balance)
        tokens = aux.tokens_per_expert.clone()
        dist.all_reduce(tokens)
        pairs = {  # (EP value, one-process value)
            "output": (y, y_ref[rows]),
            "grad_input": (gx, gx_ref[rows]),
            "grad_w_in": (grads["w_in"], grads_ref["w_in"][local]),
            "grad_w_out": (grads["w_out"], grads_ref["w_out"][local]),
            "grad_router": (router_grad, grads_ref["router.weight"]),
            "load_balance": (mean_balance, aux_ref.load_balance.detach()),
            "tokens_per_expert": (tokens.double(), aux_ref.tokens_per_expert.double()),
        }
        # The largest difference relative to the reference tensor's largest entry, the worst rank's.
        errors = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs.values()]
        errors = torch.tensor(errors)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        result[name] = dict(zip(pairs, errors.tolist(), strict=True))
        result[name]["empty_experts"] = int((aux_ref.tokens_per_expert == 0).sum())
    try:
        shard_experts(MoELayer(MoEConfig(dim=DIM, expert_hidden=8, num_experts=world + 1, top_k=1)), mesh)
        result["indivisible"] = None
    except ValueError as error:
        result["indivisible"] = str(error)
    # parallelize checks every layer before it changes any: here the second of two cannot be split
    model = torch.nn.Sequential(*(MoELayer(MoEConfig(dim=DIM, expert_hidden=8, num_experts=n)) for n in (world, 3)))
    try:
        parallelize(model, expert_parallel_mesh("cpu", world))
        result["parallelize_indivisible"] = None
    except ValueError as error:
        result["parallelize_indivisible"] = str(error)
    result["parallelize_left_unchanged"] = all(layer.expert_group is None for layer in model) and not any(
        is_fsdp_module(m) for m in model.modules()
    )
    return result
