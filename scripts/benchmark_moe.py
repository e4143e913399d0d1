"""Side-by-side forward+backward benchmark of MoE expert dispatch (results: docs/benchmarks/dispatch.md).

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``H`` expert hidden
width.

Times, in ONE process and with the SAME weights copied into every implementation:

- ours: :class:`moe_lightning.nn.layer.MoELayer` with ``dispatch`` = ``"sorted"``, ``"grouped"`` and ``"loop"``;
- Hugging Face ``MixtralSparseMoeBlock`` (if transformers is installed) in each of its expert implementations
  that runs on the device (``eager``, ``grouped_mm``, ``batched_mm`` when its per-assignment weight copies fit);
- :class:`moe_lightning.nn.layer.DenseFFN` with the same active FLOPs (``capacity_match="active"``, hidden ``K * H``).

All are SwiGLU. Each implementation first runs one warm-up step (under a memory tracker: the CPU allocator events of
``torch.profiler``, or ``torch.cuda.max_memory_allocated``), whose output and input gradient are compared to the
first implementation's (max abs difference) before anything is timed; then the median of several timed steps
gives tokens/s. Writes a markdown table and a JSON file with the ratios of our best path to HF eager, to HF's best
implementation and to dense.

Usage::

    python scripts/benchmark_moe.py                      # CPU float32, the default plan (< 5 min on 2 cores)
    python scripts/benchmark_moe.py --quick              # N=1024 only, a smoke run
    python scripts/benchmark_moe.py --device cuda        # bf16, N in {4096, 16384}, both shapes

Imports only torch, transformers (optional) and ``moe_lightning.nn.layer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_lightning.nn.layer import DenseFFN, MoEConfig, MoELayer  # noqa: E402

try:  # optional peer
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:  # pragma: no cover - exercised on machines without transformers
    transformers = None

OURS = ("ours_sorted", "ours_grouped", "ours_loop")
HF_KNOWN = ("eager", "grouped_mm", "batched_mm")  # HF expert implementations that need no downloaded kernels
SHAPES = ((8, 2), (64, 8))  # (E, K)


@dataclass
class Measurement:
    """One implementation at one shape."""

    tokens: int
    num_experts: int
    top_k: int
    impl: str
    tokens_per_s: float | None = None
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None
    max_abs_diff_out: float | None = None
    max_abs_diff_grad: float | None = None
    reference: str | None = None
    note: str = ""


def _hf_implementations(device: torch.device) -> tuple[list[str], list[str]]:
    """HF expert implementations to try on ``device``, and notes on those left out."""
    if transformers is None:
        return [], ["transformers is not installed: HF columns skipped"]
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    names = ["eager"] + [n for n in ALL_EXPERTS_FUNCTIONS.valid_keys() if n != "eager"]
    keep = [n for n in names if n in HF_KNOWN]
    notes = [
        f"HF experts_implementation={n!r} not attempted: it loads a hub kernel (network, CUDA only)"
        for n in names
        if n not in HF_KNOWN
    ]
    return keep, notes


def build_implementations(
    num_experts: int, top_k: int, dim: int, hidden: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]], list[str]]:
    """All implementations at one shape, with the same router and expert weights.

    Returns:
        ``({name: (module, fn)}, notes)``; ``fn`` maps ``x_ND`` to ``y_ND``.
    """
    torch.manual_seed(seed)
    config = MoEConfig(dim=dim, expert_hidden=hidden, num_experts=num_experts, top_k=top_k, activation="swiglu")
    ours = MoELayer(config).to(device=device, dtype=dtype)
    impls: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]] = {}
    for name in OURS:
        layer = MoELayer(MoEConfig(**{**asdict(config), "dispatch": name.removeprefix("ours_")}))
        layer.load_state_dict(ours.state_dict())
        layer.to(device=device, dtype=dtype)
        impls[name] = (layer, lambda x, m=layer: m(x)[0])
    hf_names, notes = _hf_implementations(device)
    for name in hf_names:
        hf_config = MixtralConfig(
            hidden_size=dim,
            intermediate_size=hidden,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            hidden_act="silu",
            experts_implementation=name,
        )
        block = MixtralSparseMoeBlock(hf_config).to(device=device, dtype=dtype)
        with torch.no_grad():  # HF stores nn.Linear layouts: gate_up (E, 2H, D) with gate first, down (E, D, H)
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.w_in.transpose(1, 2))
            block.experts.down_proj.copy_(ours.w_out.transpose(1, 2))
        impls[f"hf_{name}"] = (block, lambda x, m=block: m(x.unsqueeze(0)).squeeze(0))
    dense_config = MoEConfig(**{**asdict(config), "routing": "dense", "capacity_match": "active"})
    dense = DenseFFN(dense_config).to(device=device, dtype=dtype)
    impls["dense"] = (dense, lambda x, m=dense: m(x)[0])
    return impls, notes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """One training step's forward+backward; parameter gradients are freshly allocated, as after zero_grad."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


def _cpu_peak_bytes(prof: torch.profiler.profile) -> float | None:
    """Peak of the CPU allocator's running total during a profiled region, relative to its start."""
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        allocations = []
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if str(node.tag).endswith("Allocation") and node.extra_fields.device.type == "cpu":
                allocations.append(
                    (node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated)
                )
    except (AttributeError, RuntimeError):  # private profiler API; report n/a rather than fail the benchmark
        return None
    if not allocations:
        return 0.0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]
    return float(max(total for _, _, total in allocations) - start)


def _measured_step(
    module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, grad_out: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, float | None, float]:
    """The warm-up step, under a memory tracker. Returns ``(y, x_grad, peak bytes, seconds)``."""
    start = time.perf_counter()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        y, x_grad = _step(module, fn, x, grad_out)
        _sync(device)
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    else:
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            y, x_grad = _step(module, fn, x, grad_out)
        peak = _cpu_peak_bytes(prof)
    return y, x_grad, peak, time.perf_counter() - start


def _batched_mm_bytes(tokens: int, top_k: int, dim: int, hidden: int, dtype: torch.dtype) -> int:
    # HF batched_mm gathers a copy of the expert weights for every assignment: gate_up (A, 2H, D) and down (A, D, H).
    return tokens * top_k * 3 * hidden * dim * torch.tensor([], dtype=dtype).element_size()


def run_benchmark(
    tokens: list[int],
    shapes: list[tuple[int, int]],
    dim: int = 512,
    hidden: int = 1024,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    cell_budget_s: float = 15.0,
    time_limit_s: float | None = None,
    max_assignments: int | None = None,
    batched_mm_limit_gib: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every implementation at every ``(N, E, K)`` cell.

    Args:
        tokens: token counts N.
        shapes: ``(E, K)`` pairs.
        dim: model dim D.
        hidden: expert hidden width H.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        repeats: timed steps per implementation (the median is reported).
        warmup: untimed steps first (the first one also measures memory and the numerical agreement).
        cell_budget_s: fewer timed steps (at least 1) where ``repeats`` steps would take longer than this.
        time_limit_s: skip the remaining cells once the run has taken this long (None: no limit).
        max_assignments: skip cells with ``N * K`` above this (None: no limit).
        batched_mm_limit_gib: skip HF ``batched_mm`` where its per-assignment weight copies exceed this.
        log: progress printer.

    Returns:
        A JSON-ready dict: ``machine``, ``settings``, ``results`` (one entry per implementation and cell),
        ``ratios`` (one per cell), ``notes``.
    """
    allowed_dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed_dtypes:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(allowed_dtypes)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; allowed values: 'cpu', 'cuda'")
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got repeats={repeats}, warmup={warmup}")
    torch_device, torch_dtype = torch.device(device), allowed_dtypes[dtype]
    settings = {
        "tokens": tokens,
        "shapes": shapes,
        "dim": dim,
        "hidden": hidden,
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "warmup": warmup,
        "cell_budget_s": cell_budget_s,
        "time_limit_s": time_limit_s,
        "max_assignments": max_assignments,
        "batched_mm_limit_gib": batched_mm_limit_gib,
    }
    began = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results: list[Measurement] = []
    ratios, notes = [], []
    # Smallest N first, every shape at each N, so that a time limit cuts the largest N.
    cells = sorted(((n, e, k) for n in tokens for e, k in shapes), key=lambda c: (c[0], c[1]))
    for n, e, k in cells:
        if max_assignments is not None and n * k > max_assignments:
            notes.append(f"skipped N={n}, E={e}, K={k}: N*K={n * k} > max_assignments={max_assignments}")
            log(notes[-1])
            continue
        if time_limit_s is not None and time.perf_counter() - began > time_limit_s:
            notes.append(f"skipped N={n}, E={e}, K={k}: time limit of {time_limit_s:.0f} s reached")
            log(notes[-1])
            continue
        impls, impl_notes = build_implementations(e, k, dim, hidden, torch_device, torch_dtype)
        notes.extend(note for note in impl_notes if note not in notes)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(n, dim, generator=generator).to(torch_device, torch_dtype)
        grad_out = torch.randn(n, dim, generator=generator).to(torch_device, torch_dtype)
        reference: tuple[str, Tensor, Tensor] | None = None
        for name, (module, fn) in impls.items():
            m = Measurement(n, e, k, name)
            results.append(m)
            if name == "hf_batched_mm":
                need = _batched_mm_bytes(n, k, dim, hidden, torch_dtype) / 2**30
                if need > batched_mm_limit_gib:
                    m.note = f"skipped: gathers {need:.0f} GiB of per-assignment weights (> {batched_mm_limit_gib})"
                    log(f"N={n} E={e} K={k} {name}: {m.note}")
                    continue
            y, x_grad, peak, first_s = _measured_step(module, fn, x, grad_out, torch_device)
            m.peak_mem_mib = None if peak is None else peak / 2**20
            if name != "dense":  # dense computes a different function: no agreement to check
                if reference is None:
                    reference = (name, y, x_grad)
                m.reference = reference[0]
                m.max_abs_diff_out = (y.float() - reference[1].float()).abs().max().item()
                m.max_abs_diff_grad = (x_grad.float() - reference[2].float()).abs().max().item()
            del y, x_grad
            for _ in range(warmup - 1):
                _step(module, fn, x, grad_out)
            runs = max(1, min(repeats, math.floor(cell_budget_s / max(first_s, 1e-9))))
            for _ in range(runs):
                _sync(torch_device)
                start = time.perf_counter()
                _step(module, fn, x, grad_out)
                _sync(torch_device)
                m.times_s.append(time.perf_counter() - start)
            m.median_s = statistics.median(m.times_s)
            m.tokens_per_s = n / m.median_s
            if runs < repeats:
                m.note = f"{runs} of {repeats} runs (cell budget {cell_budget_s:.0f} s)"
            log(
                f"N={n} E={e} K={k} {name:>14}: {m.tokens_per_s:10.0f} tok/s, median {m.median_s:.3f} s of "
                f"{runs}, peak {_fmt(m.peak_mem_mib, '.0f')} MiB, max|dy| {_fmt(m.max_abs_diff_out, '.1e')}"
            )
        del impls
        ratios.append(_ratios([r for r in results if (r.tokens, r.num_experts, r.top_k) == (n, e, k)]))
    return {
        "machine": {**_machine(torch_device), "load_average_at_start": load_at_start},
        "settings": settings,
        "results": [asdict(r) for r in results],
        "ratios": ratios,
        "notes": notes,
        "elapsed_s": time.perf_counter() - began,
    }


def _ratios(cell: list[Measurement]) -> dict:
    """Our best path against HF eager, HF's best implementation and dense, in one cell."""
    timed = {r.impl: r.tokens_per_s for r in cell if r.tokens_per_s is not None}
    ours = {k: v for k, v in timed.items() if k in OURS}
    hf = {k: v for k, v in timed.items() if k.startswith("hf_")}
    best = max(ours, key=ours.get)
    hf_best = max(hf, key=hf.get) if hf else None
    first = cell[0]
    return {
        "tokens": first.tokens,
        "num_experts": first.num_experts,
        "top_k": first.top_k,
        "best_ours": best,
        "best_ours_tokens_per_s": ours[best],
        "hf_best": hf_best,
        "vs_hf_eager": ours[best] / timed["hf_eager"] if "hf_eager" in timed else None,
        "vs_hf_best": ours[best] / hf[hf_best] if hf_best else None,
        "vs_dense": ours[best] / timed["dense"] if "dense" in timed else None,
    }


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "torch": torch.__version__,
        "transformers": getattr(transformers, "__version__", None),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """Markdown: one row per implementation and cell, then one row of ratios per cell."""
    lines = [
        "| N | E | K | implementation | tokens/s | median s (runs) | peak MiB | max abs diff y / dx | note |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in report["results"]:
        diff = "n/a" if r["max_abs_diff_out"] is None else f"{r['max_abs_diff_out']:.1e} / {r['max_abs_diff_grad']:.1e}"
        timing = "-" if r["median_s"] is None else f"{r['median_s']:.3f} ({len(r['times_s'])})"
        lines.append(
            f"| {r['tokens']} | {r['num_experts']} | {r['top_k']} | {r['impl']} | {_fmt(r['tokens_per_s'], ',.0f')} "
            f"| {timing} | {_fmt(r['peak_mem_mib'], ',.0f')} | {diff} | {r['note']} |"
        )
    lines += [
        "",
        "| N | E | K | our best | vs HF eager | vs HF best (which) | vs dense |",
        "| ---: | ---: | ---: | --- | ---: | --- | ---: |",
    ]
    for q in report["ratios"]:
        lines.append(
            f"| {q['tokens']} | {q['num_experts']} | {q['top_k']} | {q['best_ours']} "
            f"| {_fmt(q['vs_hf_eager'], '.2f')}x | {_fmt(q['vs_hf_best'], '.2f')}x ({q['hf_best']}) "
            f"| {_fmt(q['vs_dense'], '.2f')}x |"
        )
    if report["notes"]:
        lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts N (default 4096 16384)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps, median reported (default 3; 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; 3 on CUDA)")
    parser.add_argument("--cell-budget", type=float, default=None, help="seconds per implementation and cell")
    parser.add_argument("--time-limit", type=float, default=None, help="skip remaining cells after this many s")
    parser.add_argument("--max-assignments", type=int, default=None, help="skip cells with N*K above this (0: none)")
    parser.add_argument("--quick", action="store_true", help="N=1024 only, 2 timed runs")
    parser.add_argument("--out", default="runs/benchmark_moe.json", help="JSON output path")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    # CPU defaults keep the whole run under 5 minutes on 2 cores: N*K=131072 (N=16384, K=8) alone would take
    # ~10 minutes over all implementations there, so it runs only on CUDA unless --max-assignments 0.
    tokens = args.tokens or ([1024] if args.quick else [4096, 16384])
    max_assignments = args.max_assignments if args.max_assignments is not None else (32768 if on_cpu else 0)
    report = run_benchmark(
        tokens=tokens,
        shapes=list(SHAPES),
        dim=args.dim,
        hidden=args.hidden,
        device=args.device,
        dtype=args.dtype or ("float32" if on_cpu else "bfloat16"),
        repeats=args.repeats or (2 if args.quick else 3 if on_cpu else 10),
        warmup=args.warmup or (1 if on_cpu else 3),
        cell_budget_s=args.cell_budget or (2.0 if args.quick else 15.0 if on_cpu else 60.0),
        time_limit_s=args.time_limit
        if args.time_limit is not None
        else (40.0 if args.quick else 200.0 if on_cpu else 500.0),
        max_assignments=max_assignments or None,
    )
    table = format_table(report)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "table": table}, indent=2))
    print(f"wrote {out} ({report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
