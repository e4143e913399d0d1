"""One training step of a 64-expert MoE layer at EP=1 and at EP=P, side by side (results:
docs/benchmarks/expert-parallel.md).

Shape legend: ``P`` processes, ``N`` tokens per rank, ``E`` experts, ``K`` experts per token, ``D`` model dim, ``H``
expert hidden width.

P processes (gloo on CPU, NCCL on CUDA; ``--device cuda`` uses every visible GPU) each route their own N tokens
through the same SwiGLU :class:`moe_lightning.nn.layer.MoELayer`:

- EP=1: every rank holds all E experts (data parallelism); a step is forward, backward and the all-reduce of every
  gradient that data parallelism needs;
- EP=P: each rank holds E/P experts (:func:`moe_lightning.distributed.expert_parallel.shard_experts`), the
  assignments travel with ``all_to_all_single``; a step is forward, backward (both with their exchanges) and the
  all-reduce of the router's gradient, the one replicated weight.

Both start from the same weights and are checked against each other (output and input gradient) before timing.
The median of the timed steps is reported, with the share of the step ``torch.profiler`` attributes to the
``all_to_all`` collectives (forward and backward) and to the gradient all-reduce. Prints a markdown table and the
EP=P / EP=1 ratio; writes JSON with ``--json``.

Usage::

    python scripts/benchmark_expert_parallel.py                  # CPU, P=2, float32
    python scripts/benchmark_expert_parallel.py --processes 4
    python scripts/benchmark_expert_parallel.py --device cuda    # all visible GPUs, bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_lightning.distributed.expert_parallel import shard_experts  # noqa: E402
from moe_lightning.nn.layer import MoEConfig, MoELayer  # noqa: E402

COLLECTIVE_KEYS = {"all_to_all": ("all_to_all", "alltoall", "sendrecv"), "all_reduce": ("all_reduce", "allreduce")}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=None, help="P; default 2 on CPU, every GPU on CUDA")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=None, help="D; default 128 on CPU, 1024 on CUDA")
    parser.add_argument("--hidden", type=int, default=None, help="H; default 256 on CPU, 1408 on CUDA")
    parser.add_argument("--tokens", type=int, default=None, help="N per rank; default 2048 on CPU, 16384 on CUDA")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.processes = args.processes or (2 if cpu else torch.cuda.device_count())
    args.dim = args.dim or (128 if cpu else 1024)
    args.hidden = args.hidden or (256 if cpu else 1408)
    args.tokens = args.tokens or (2048 if cpu else 16384)
    return args


def _step(layer: MoELayer, x, grad_out, grads_to_reduce) -> None:
    y, _ = layer(x)
    y.backward(grad_out)
    for grad in grads_to_reduce():
        dist.all_reduce(grad)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, steps: int, device: torch.device) -> tuple[float, dict[str, float]]:
    """Median seconds of ``fn`` over ``steps`` calls, and each collective's share of the profiled steps."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        profiled = time.perf_counter() - start
    shares = {}
    events = prof.key_averages()
    for label, needles in COLLECTIVE_KEYS.items():
        # The backend's own time in the collectives: gloo's work (on its threads, the host waiting on it) on CPU,
        # the NCCL kernels on CUDA. Waiting for a slower peer counts as collective time.
        if device.type == "cuda":
            spent = sum(e.device_time_total for e in events if "nccl" in e.key.lower() and _matches(e.key, needles))
        else:
            spent = sum(e.cpu_time_total for e in events if e.key.startswith("gloo:") and _matches(e.key, needles))
        shares[label] = spent / 1e6 / profiled
    return statistics.median(times), shares


def _matches(key: str, needles: tuple[str, ...]) -> bool:
    return any(n in key.lower().replace("_", "") for n in (n.replace("_", "") for n in needles))


def _worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.processes)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = MoEConfig(
        dim=args.dim, expert_hidden=args.hidden, num_experts=args.experts, top_k=args.top_k, activation="swiglu"
    )
    replicated = MoELayer(config).to(device=device, dtype=dtype)
    sharded = copy.deepcopy(replicated)
    shard_experts(sharded, init_device_mesh(device.type, (args.processes,)))
    gen = torch.Generator(device=device).manual_seed(rank + 1)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, generator=gen)
    grad_out = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, generator=gen)

    checks = []
    for layer in (replicated, sharded):
        x_in = x.clone().requires_grad_()
        y, _ = layer(x_in)
        y.backward(grad_out)
        checks.append((y.detach(), x_in.grad))
        layer.zero_grad(set_to_none=True)
    difference = max((a - b).abs().max().item() for a, b in zip(*checks, strict=True))

    def replicated_step() -> None:
        replicated.zero_grad(set_to_none=False)
        _step(replicated, x, grad_out, lambda: [p.grad for p in replicated.parameters()])

    def sharded_step() -> None:
        sharded.zero_grad(set_to_none=False)
        _step(sharded, x, grad_out, lambda: [sharded.router.weight.grad])

    rows = {}
    for name, fn in (("EP=1", replicated_step), (f"EP={args.processes}", sharded_step)):
        dist.barrier()
        seconds, shares = _time(fn, args.steps, device)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        rows[name] = {"step_ms": slowest.item() * 1e3, **{f"{k}_share": v for k, v in shares.items()}}
    if rank == 0:
        results.update(rows=rows, max_abs_difference=difference)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    if args.experts % args.processes:
        raise ValueError(f"--experts={args.experts} must be divisible by --processes={args.processes}")
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(args, _free_port(), shared), nprocs=args.processes)
        result = dict(shared)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    result["setup"] = {
        "device": f"{args.device} ({device_name})",
        "processes": args.processes,
        "E": args.experts,
        "K": args.top_k,
        "D": args.dim,
        "H": args.hidden,
        "N_per_rank": args.tokens,
        "torch": torch.__version__,
        "threads_per_process": max(1, (os.cpu_count() or 1) // args.processes),
    }
    rows = result["rows"]
    ep1, epp = rows["EP=1"], rows[f"EP={args.processes}"]
    result["ratio_step_ep_p_over_ep1"] = epp["step_ms"] / ep1["step_ms"]
    setup = result["setup"]
    print(
        f"{setup['device']}, P={setup['processes']}, E={setup['E']}, K={setup['K']}, D={setup['D']}, "
        f"H={setup['H']}, N={setup['N_per_rank']} tokens per rank, torch {setup['torch']}"
    )
    print("| layout | step (ms) | all_to_all share | gradient all-reduce share |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_ms']:.1f} | {row['all_to_all_share']:.1%} | {row['all_reduce_share']:.1%} |")
    print(f"EP={args.processes} / EP=1 step time: {result['ratio_step_ep_p_over_ep1']:.2f}")
    print(f"largest |EP=1 - EP={args.processes}| of output and input gradient: {result['max_abs_difference']:.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
