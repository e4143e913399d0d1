"""Benchmark of the whole probe on one MoE layer at the sizes of real checkpoints (results:
docs/benchmarks/real-scale.md).

For each row, one :class:`~moe_lightning.nn.MoELayer` with random weights at that model's sizes (float32, SwiGLU
experts as in all four models; DeepSeek-V3 with sigmoid scoring and one shared expert), probed with the probe's
defaults (``ProbeConfig()``: float64, every quantity) on random tokens. Each row runs in a fresh Python process so
that its peak memory is its own. Per row it prints:

- ``build s`` and ``probe s``: wall time to build the layer and to probe it;
- ``layer GiB``: the resident set after building the layer (the weights, plus the interpreter and torch);
- ``peak GiB``: on CPU the process's resident-set high-water mark (``resource.getrusage(...).ru_maxrss``, which
  counts everything, the layer included); on CUDA ``torch.cuda.max_memory_allocated`` (torch's allocations only);
- ``finite/total``: the finite values among the report's aggregate scalars (``report.scalars(max_experts=0)``:
  layer-level quantities and per-quantity means over experts), and the keys that are not finite.

Usage:
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b                 # one row (minutes on 2 CPU cores)
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b --tokens 32
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b --quantities representational   # PCA + subspaces
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b --quantities all-but-pointwise-alignment
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b --pairs 256   # pointwise alignment on 256 pairs
    python scripts/benchmark_real_scale.py --rows qwen3-30b-a3b --pairs 256 --timings   # and where the time goes
    python scripts/benchmark_real_scale.py --device cuda                        # every row on one GPU
    python scripts/benchmark_real_scale.py --ceiling          # the exact pointwise alignment's arithmetic floor

``--timings`` also prints the wall time spent in each accumulator's steps (``add``, ``close``, ``finalize``, by
class; :func:`accumulator_timings`), and in the layer Jacobian's top-``r`` solves, which run inside its ``add`` and
``close``.

``--ceiling`` probes nothing: it measures this machine's float64 matrix-product rate (the best of 5 products of two
2048 x 2048 matrices, every thread) and prints, per row, the flops of the exact pointwise alignment's weight Grams
(docs/geometry.md §4: one ``F x F`` Gram per pair of experts and per expert, ``10 H² D`` flops each for SwiGLU) and
the time they take at that rate: a lower bound on any exact computation of it by this method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

#: name -> (model dim, expert hidden, experts, top-k, shared experts, scoring), from the models' configs.
ROWS: dict[str, tuple[int, int, int, int, int, str]] = {
    "mixtral-8x7b": (4096, 14336, 8, 2, 0, "softmax"),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 0, "softmax"),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0, "softmax"),
    "gpt-oss-20b": (2880, 2880, 32, 4, 0, "softmax"),
    "deepseek-v3": (7168, 2048, 256, 8, 1, "sigmoid"),
}


@dataclass
class Result:
    row: str
    device: str
    tokens: int
    build_s: float
    probe_s: float
    layer_gib: float
    peak_gib: float
    peak_kind: str
    finite: int
    total: int
    not_finite: list[str]
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _rss_gib() -> float:
    """This process's resident-set high-water mark so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


#: ``--quantities``: every quantity (the probe's defaults); every one but the pointwise alignment, whose pairwise
#: Grams (``O(E² · D · F²)``) dominate at real sizes; or the representational ones alone (weighted PCA at the three
#: sites and the representational subspaces), which isolates the PCA's memory from the Jacobians' time.
QUANTITIES = {
    "all": {},
    "all-but-pointwise-alignment": {"pointwise_alignment": False},
    "representational": {"jacobian": False, "layer_jacobian": False, "alignment": False, "cka": False},
}


@contextlib.contextmanager
def accumulator_timings() -> Iterator[dict[str, float]]:
    """Within the block, the wall time spent in each probe accumulator's ``add``, ``close`` and ``finalize`` (keys
    ``Class.step``, summed over calls) and in the layer Jacobian's top-``r`` solves (``LayerJacobian top-r``, which
    run inside its ``add`` and ``close``); the methods are restored on exit."""
    from moe_lightning.geometry.accumulators.base import Accumulator
    from moe_lightning.geometry.accumulators.layer_jacobian import LayerJacobian

    spent: dict[str, float] = {}
    restore = []

    def wrap(cls: type, name: str, key: str) -> None:
        method = cls.__dict__[name]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start

        setattr(cls, name, timed)
        restore.append((cls, name, method))

    classes, stack = set(), [Accumulator]
    while stack:
        cls = stack.pop()
        classes.add(cls)
        stack.extend(cls.__subclasses__())
    for cls in sorted(classes, key=lambda c: c.__name__):
        for step in ("add", "close", "finalize"):
            if step in cls.__dict__:
                wrap(cls, step, f"{cls.__name__}.{step}")
    wrap(LayerJacobian, "_top_values", "LayerJacobian top-r")
    try:
        yield spent
    finally:
        for cls, name, method in reversed(restore):
            setattr(cls, name, method)


def run_row(
    name: str, tokens: int, device: str, quantities: str = "all", pairs: int | None = None, timings: bool = False
) -> Result:
    """Build one row's layer, probe it and measure; in this process (called in a fresh one by :func:`main`)."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import ProbeConfig, probe
    from moe_lightning.nn import MoEConfig, MoELayer

    d, h, e, k, shared, scoring = ROWS[name]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = MoEConfig(
        dim=d,
        expert_hidden=h,
        num_experts=e,
        top_k=k,
        activation="swiglu",
        scoring=scoring,
        num_shared_experts=shared,
    )
    layer = MoELayer(config).to(device)
    build_s = time.perf_counter() - t0
    layer_gib = _rss_gib()
    view = find_moe_layers(layer)[0]  # the routed experts (a shared expert is a view of its own)
    x = torch.randn(tokens, d, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    error, scalars = "", {}
    with accumulator_timings() if timings else contextlib.nullcontext({}) as spent:
        try:
            report = probe(view, x, ProbeConfig(**QUANTITIES[quantities], pointwise_alignment_pairs=pairs))
            scalars = report.scalars("", max_experts=0)
        except Exception as caught:  # a failed row is reported, not hidden
            error = repr(caught)[:300]
    probe_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_memory_allocated"
    else:
        peak, kind = _rss_gib(), "rss_high_water"
    not_finite = sorted(key.lstrip("/") for key, value in scalars.items() if not math.isfinite(value))
    finite = len(scalars) - len(not_finite)
    return Result(
        name, device, tokens, build_s, probe_s, layer_gib, peak, kind, finite, len(scalars), not_finite, error, spent
    )


def gemm_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """The best float64 rate of ``repeats`` products of two ``n x n`` matrices, in GFLOP/s (``2 n³`` flops each)."""
    a = torch.randn(n, n, dtype=torch.float64, device=device)
    b = torch.randn(n, n, dtype=torch.float64, device=device)
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def pointwise_alignment_flops(dim: int, hidden: int, experts: int) -> float:
    """Flops of the exact pointwise alignment's weight Grams for SwiGLU experts: a Gram per expert (its norms) and
    per pair, each ``(A_iᵀA_j)`` (``2 H² D``) and ``B_i B_jᵀ`` over both groups (``2 (2H)² D``)."""
    grams = experts * (experts - 1) // 2 + experts
    return grams * 10 * hidden**2 * dim


def print_ceiling(rows: list[str], device: str) -> None:
    rate = gemm_gflops(device)
    print(f"float64 matrix products on {device}, {torch.get_num_threads()} threads: {rate:.1f} GFLOP/s (best of 5)")
    print(f"{'row':<18} {'Grams':>7} {'TFLOP':>8} {'minutes at that rate':>21}")
    for name in rows:
        d, h, e, *_ = ROWS[name]
        flops = pointwise_alignment_flops(d, h, e)
        grams = e * (e - 1) // 2 + e
        print(f"{name:<18} {grams:>7} {flops / 1e12:>8.1f} {flops / (rate * 1e9) / 60:>21.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which models' sizes")
    parser.add_argument("--tokens", type=int, default=256, help="probe tokens")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantities", default="all", choices=list(QUANTITIES), help="which quantities to probe")
    parser.add_argument(
        "--pairs", type=int, help="ProbeConfig.pointwise_alignment_pairs: the pointwise alignment on this many pairs"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row here and print its JSON
    parser.add_argument("--ceiling", action="store_true", help="print the pointwise alignment's arithmetic floor")
    parser.add_argument("--timings", action="store_true", help="print the time of each accumulator's steps")
    args = parser.parse_args()
    if args.ceiling:
        print_ceiling(args.rows, args.device)
        return
    if args.one:
        result = run_row(args.one, args.tokens, args.device, args.quantities, args.pairs, args.timings)
        print(json.dumps(result.__dict__))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.tokens} tokens, "
        f"{args.quantities} quantities" + ("" if args.pairs is None else f", pointwise alignment on {args.pairs} pairs")
    )
    header = f"{'row':<18} {'build s':>8} {'probe s':>8} {'layer GiB':>9} {'peak GiB':>9} {'finite/total':>12}"
    print(header)
    for name in args.rows:
        command = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens), "--device", args.device]
        command += ["--quantities", args.quantities] + ([] if args.pairs is None else ["--pairs", str(args.pairs)])
        command += ["--timings"] if args.timings else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:<18} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = Result(**json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"{r.row:<18} {r.build_s:>8.1f} {r.probe_s:>8.1f} {r.layer_gib:>9.2f} {r.peak_gib:>9.2f} "
            f"{f'{r.finite}/{r.total}':>12}  ({r.peak_kind})"
        )
        if r.error:
            print(f"    error: {r.error}")
        for key, seconds in sorted(r.timings.items(), key=lambda item: -item[1]):
            print(f"    {key:<32} {seconds:>8.1f} s")
        if r.not_finite:
            print(f"    not finite: {', '.join(r.not_finite)}")


if __name__ == "__main__":
    main()
