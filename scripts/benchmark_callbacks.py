"""Training wall-time overhead of GeometryMonitor and RouterMonitor at their default schedule.

Builds the model and the data of ``configs/transformer/wikitext_topk.yaml`` (3-layer WikiText transformer, top-2
of 8 experts) and trains the same number of steps from the same seed, in one process, with no callback, with
``RouterMonitor()`` and with ``GeometryMonitor()``. The variants run in alternating order (A B C, C B A, ...) so that
slow drifts of a shared machine hit them alike; the median over repeats is reported.

Two numbers per monitor:
- ``measured``: (wall time with - without) / without over the run, which includes the fit-start probe;
- ``steady state``: the per-call cost of the monitor, spread over its interval (GeometryMonitor probes every
  ``every_n_steps=200`` steps), over the median step time; for RouterMonitor, which summarises every batch and
  logs every ``log_every_n_steps``, all of its time over all steps. For runs much longer than one interval this is
  the overhead the user sees.

Usage:
    python scripts/benchmark_callbacks.py --steps 200 --repeats 2
    python scripts/benchmark_callbacks.py --quick   # 40 steps, 1 repeat: a smoke run
    python scripts/benchmark_callbacks.py --device cuda --out runs/benchmark_callbacks.json   # one GPU, bf16-mixed
    python scripts/benchmark_callbacks.py --clock cpu --threads 1 --parts   # a busy machine: CPU time, per part
    python scripts/benchmark_callbacks.py --variants shipped shipped_in_step --steps 600 --repeats 3
    python scripts/benchmark_callbacks.py --variants none --steps 80 --repeats 1 --contention   # a forked child
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch import Callback

from moe_lightning.callbacks import GeometryMonitor, RouterMonitor
from moe_lightning.data import WikiTextDataModule
from moe_lightning.lightning.modules import CausalLMModule
from moe_lightning.monitors import router_probe
from moe_lightning.nn.models import TransformerMoEConfig

#: The timers' clock: wall time, or with ``--clock cpu`` this process's CPU time (every thread's), which a busy
#: shared machine inflates far less; with ``--threads 1`` it is the time the work takes on one core.
CLOCK: Callable[[], float] = time.perf_counter

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "transformer" / "wikitext_topk.yaml"


def synchronize() -> None:
    """Wait for the GPU, where one is in use: CUDA runs asynchronously, and a host timer would stop at the launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time of the whole fit loop (first batch start to last batch end) and of every training batch."""

    def __init__(self) -> None:
        self.batch_times: list[float] = []
        self._batch_start = 0.0
        self.fit_start = 0.0
        self.fit_end = 0.0
        self.last_batch_end = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        synchronize()
        self.fit_start = CLOCK()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self._batch_start = CLOCK()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.last_batch_end = CLOCK()
        self.batch_times.append(self.last_batch_end - self._batch_start)

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize()
        self.fit_end = CLOCK()


def timed(monitor: Any, method: str, log: list[float], when: Callable[[], bool] = lambda: True) -> None:
    """Wrap ``monitor.method`` so that the wall time of each call that does work (``when()`` true on entry) is
    appended to ``log``."""
    original = getattr(monitor, method)

    def wrapper(*args, **kwargs):
        if not when():
            return original(*args, **kwargs)
        synchronize()
        start = CLOCK()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize()
            log.append(CLOCK() - start)

    setattr(monitor, method, wrapper)


def load_config() -> dict[str, Any]:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def build(config: dict[str, Any], seed: int) -> CausalLMModule:
    L.seed_everything(seed, verbose=False)
    init = dict(config["model"]["init_args"])
    model_config = TransformerMoEConfig(**init.pop("config"))
    return CausalLMModule(model_config, **init)


def run_variant(
    name: str,
    config: dict[str, Any],
    data: WikiTextDataModule,
    steps: int,
    seed: int,
    device: str = "cpu",
    precision: str = "32-true",
    probe_tokens: int | None = None,
    module: CausalLMModule | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps with the named monitor on ``device`` (``"cpu"`` or ``"cuda"``, one device) in
    ``precision``, GeometryMonitor probing ``probe_tokens`` tokens (None: its default); return the fit wall time and
    the monitor's own call times. ``module`` is trained if given, else the config's model built from ``seed``."""
    callbacks: list[Callback] = []
    calls: list[float] = []
    values: dict[int, dict[str, float]] = {}  # the config's GeometryMonitor's values by step
    batch_sums = router_probe.batch_sums
    if name == "router":
        # Every batch: the forward hooks' summaries (batch_sums) and the window update in on_train_batch_end; every
        # log_every_n_steps that call also reduces, computes and logs. All of it counts, spread over the steps.
        monitor = RouterMonitor()
        timed(monitor, "on_train_batch_end", calls)
        timed(router_probe, "batch_sums", calls)
        callbacks.append(monitor)
    elif name == "geometry":
        monitor = GeometryMonitor() if probe_tokens is None else GeometryMonitor(max_tokens=probe_tokens)
        timed(monitor, "run_probe", calls)
        callbacks.append(monitor)
    elif name in SHIPPED:
        # The config's own GeometryMonitor (its cadence and tokens; beside training as the config says, or in the
        # step), without the final probe at the end of fit: the run's loop time then holds the steady state only.
        # Every call of its on_train_batch_end counts (the probes in the step; the captures, and the deliveries of
        # probes computed beside training).
        options = {**shipped_options(config), "at_fit_end": False}
        options["background"] = name == "shipped" and options.get("background", False)
        if probe_tokens is not None:
            options["max_tokens"] = probe_tokens
        monitor = GeometryMonitor(**options)
        timed(monitor, "on_train_batch_end", calls)
        monitor.core.log = lambda scalars, step: values.__setitem__(step, dict(scalars))  # every delivered probe
        callbacks.append(monitor)
    timer = StepTimer()
    trainer_args = dict(config["trainer"])
    trainer = L.Trainer(
        max_steps=steps,
        log_every_n_steps=trainer_args.get("log_every_n_steps", 50),
        gradient_clip_val=trainer_args.get("gradient_clip_val"),
        accelerator=device,
        devices=1,
        precision=precision,
        logger=L.pytorch.loggers.CSVLogger(os.environ.get("TMPDIR", "/tmp"), name="benchmark_callbacks"),
        callbacks=[*callbacks, timer],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = build(config, seed) if module is None else module
    try:
        trainer.fit(module, data)
    finally:
        router_probe.batch_sums = batch_sums  # the wrapper of this run only
    return {
        "wall": timer.fit_end - timer.fit_start,
        "loop": timer.last_batch_end - timer.fit_start,
        "step": statistics.median(timer.batch_times),
        "calls": calls,
        "interval": monitor.every_n_steps if name in ("geometry", *SHIPPED) else int(name == "router"),
        "probes": len(monitor.probed_steps) if name in ("geometry", *SHIPPED) else 0,
        "values": values,
        "children": monitor.core.beside.child_times if name == "shipped" else [],
    }


def shipped_options(config: dict[str, Any]) -> dict[str, Any]:
    """The init_args of the GeometryMonitor the config ships (empty if it ships none)."""
    for callback in config["trainer"].get("callbacks") or []:
        if callback["class_path"].endswith("GeometryMonitor"):
            return dict(callback.get("init_args") or {})
    return {}


def shipped_cadence(config: dict[str, Any]) -> int | None:
    """``every_n_steps`` of the GeometryMonitor the config ships, if it has one."""
    return shipped_options(config).get("every_n_steps")


#: The runs a benchmark may compare.
VARIANTS = ("none", "router", "geometry", "shipped", "shipped_in_step")
#: The config's own GeometryMonitor: as shipped (beside training), and with its probes in the step.
SHIPPED = ("shipped", "shipped_in_step")

#: The steady-state overhead GeometryMonitor may cost at the shipped configs' cadence.
SHIPPED_TARGET = 0.02


def summarise(results: dict[str, list[dict[str, Any]]], steps: int, shipped: int | None = None) -> dict[str, Any]:
    """Baseline step time and each monitor's measured and steady-state overhead, printed and returned; with
    ``shipped``, GeometryMonitor's steady state also at that cadence (the same per-call cost over ``shipped``
    steps)."""
    base_wall = statistics.median(x["wall"] for x in results["none"])
    base_step = statistics.median(x["step"] for x in results["none"])
    print(f"\nbaseline: {base_wall:.2f}s for {steps} steps, median step {base_step * 1e3:.1f} ms")
    summary: dict[str, Any] = {"baseline_wall_s": base_wall, "baseline_step_ms": base_step * 1e3}
    for name, target in (("router", 0.02), ("geometry", 0.05)):
        if name not in results:
            continue
        wall = statistics.median(x["wall"] for x in results[name])
        calls = [c for x in results[name] for c in x["calls"]]
        interval = results[name][0]["interval"]
        if name == "router":  # its cost per training step: all of its time over all steps
            per_call = sum(calls) / (steps * len(results[name]))
        else:
            per_call = statistics.median(calls) if calls else 0.0
        steady = per_call / (interval * base_step) if interval else float("nan")
        measured = wall / base_wall - 1
        verdict = "meets" if steady <= target else "MISSES"
        print(
            f"{name:9s}: measured {measured * 100:+6.2f}% over the run ({len(calls) // len(results[name])} calls); "
            f"per call {per_call * 1e3:8.1f} ms every {interval} steps -> steady state {steady * 100:5.2f}% "
            f"({verdict} the {target * 100:.0f}% target)"
        )
        summary[name] = {
            "measured": measured,
            "per_call_ms": per_call * 1e3,
            "every_n_steps": interval,
            "steady_state": steady,
            "target": target,
        }
        if name == "geometry" and shipped:
            at_shipped = per_call / (shipped * base_step)
            verdict = "meets" if at_shipped <= SHIPPED_TARGET else "MISSES"
            print(
                f"{'':9s}  at the shipped cadence, every {shipped} steps -> steady state {at_shipped * 100:5.2f}% "
                f"({verdict} the {SHIPPED_TARGET * 100:.0f}% target)"
            )
            summary[name]["shipped"] = {"every_n_steps": shipped, "steady_state": at_shipped, "target": SHIPPED_TARGET}
    for name in SHIPPED:
        if name in results:
            summary[name] = summarise_shipped(results, name, steps)
    if all(name in results for name in SHIPPED):
        summary["shipped"]["max_relative_difference"] = compare_values(results)
    return summary


def summarise_shipped(results: dict[str, list[dict[str, Any]]], name: str, steps: int) -> dict[str, Any]:
    """The config's own GeometryMonitor: its overhead over the training loop (first batch to last batch end, so
    that it holds the probes computed beside training and the steps they share the CPU with), the median of the
    rounds, each round against the run without a monitor of the same round; and the time spent in its hook."""
    rounds = [s["loop"] / n["loop"] - 1 for s, n in zip(results[name], results["none"], strict=True)]
    measured = statistics.median(rounds)
    in_hook = statistics.median(sum(x["calls"]) / x["loop"] for x in results[name])
    first = results[name][0]
    children = [c for x in results[name] for c in x["children"]]
    if children:  # each forked child's CPU time over its life: the share of a core it had beside training
        shares = statistics.median(cpu / wall for _, cpu, wall in children)
        cpu, wall = statistics.median(c[1] for c in children), statistics.median(c[2] for c in children)
        print(
            f"{name}: {len(children)} probes computed beside training, each child {cpu:.2f} CPU s over {wall:.1f} s "
            f"(median share of a core {shares * 100:.1f}%)"
        )
    verdict = "meets" if measured <= SHIPPED_TARGET else "MISSES"
    print(
        f"{name}: the config's GeometryMonitor, {first['probes']} probes in {steps} steps (every "
        f"{first['interval']}): loop time {measured * 100:+6.2f}% (rounds: "
        f"{', '.join(f'{r * 100:+.2f}%' for r in rounds)}), of which in its hook {in_hook * 100:5.2f}% "
        f"({verdict} the {SHIPPED_TARGET * 100:.0f}% target)"
    )
    return {
        "measured": measured,
        "rounds": rounds,
        "in_hook": in_hook,
        "every_n_steps": first["interval"],
        "probes": first["probes"],
        "children": children,
        "target": SHIPPED_TARGET,
    }


def compare_values(results: dict[str, list[dict[str, Any]]]) -> float:
    """The largest relative difference between a value computed beside training and the same key at the same step
    probed in the step, over every key, step and round (the runs train the same weights)."""
    worst, count = 0.0, 0
    for beside, in_step in zip(results["shipped"], results["shipped_in_step"], strict=True):
        if sorted(beside["values"]) != sorted(in_step["values"]):
            raise RuntimeError(f"probed steps differ: {sorted(beside['values'])} vs {sorted(in_step['values'])}")
        for step, expected in in_step["values"].items():
            for key, value in expected.items():
                found, count = beside["values"][step][key], count + 1
                if found != value and (value == value or found == found):  # equal, or NaN in both: agree
                    worst = max(worst, abs(found - value) / max(abs(value), abs(found)))
    print(f"values beside training vs in the step: {count} values, largest relative difference {worst:.2e}")
    return worst


#: Each part of one layer's probe, as the ProbeConfig flags of the probe with it and of the probe it adds to.
PARTS: dict[str, tuple[dict[str, bool], dict[str, bool]]] = {
    "expert Jacobians and their SVDs": ({"jacobian": True}, {}),
    "layer Jacobian through the router": ({"jacobian": True, "layer_jacobian": True}, {"jacobian": True}),
    "alignment": ({"jacobian": True, "alignment": True}, {"jacobian": True}),
    "subspaces": (
        {"jacobian": True, "alignment": True, "subspaces": True},
        {"jacobian": True, "alignment": True},
    ),
    "weighted PCA": ({"pca": True}, {}),
    "CKA": ({"cka": True}, {}),
}


def time_parts(config: dict[str, Any], data: WikiTextDataModule, seed: int, tokens: int, repeats: int = 3) -> dict:
    """Seconds of one probe of the model's first MoE layer (at initialisation, ``tokens`` inputs of one training
    batch, float64) with every part, and of each part of :data:`PARTS`: the difference between the probes with and
    without it, each the fastest of ``repeats``."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.adapters.capture import capture_layer_inputs
    from moe_lightning.geometry import ProbeConfig, probe

    module = build(config, seed)
    view = find_moe_layers(module.model)[0]
    inputs, _ = next(iter(data.train_dataloader()))
    x = capture_layer_inputs(module, [view], [inputs])[view.name]
    x = x.reshape(-1, x.shape[-1])[:tokens]
    off = dict.fromkeys(("jacobian", "layer_jacobian", "pca", "alignment", "cka", "subspaces"), False)

    def seconds(flags: dict[str, bool] | None) -> float:
        if flags == {}:
            return 0.0
        cfg = ProbeConfig() if flags is None else ProbeConfig(**{**off, **flags})
        probe(view, x, cfg)  # warm-up
        times = []
        for _ in range(repeats):
            start = CLOCK()
            probe(view, x, cfg)
            times.append(CLOCK() - start)
        return min(times)

    parts = {"whole probe": seconds(None)}
    for name, (with_part, without) in PARTS.items():
        parts[name] = seconds(with_part) - seconds(without)
    print(f"\none probe of {view.name} ({x.shape[0]} tokens, D = {x.shape[1]}, float64), seconds:")
    for name, value in parts.items():
        print(f"  {name:36s} {value:6.3f}")
    return parts


def _svds_forever() -> None:
    """A child that keeps one core busy with the probe's kind of work: SVDs of 128 x 128 float64 matrices."""
    matrices = torch.randn(64, 128, 128, dtype=torch.float64)
    while True:
        torch.linalg.svdvals(matrices)


def contention(config: dict[str, Any], data: WikiTextDataModule, steps: int, seed: int) -> dict[str, Any]:
    """The median training step alone, and beside a forked child that computes SVDs flat out with one thread, at
    niceness 19 (how GeometryMonitor(background=True) runs its probe) and at the parent's priority; with the share
    of a core each child had while training ran (its CPU time over the run's wall time)."""
    from moe_lightning.monitors.background import ForkedCall, process_cpu_seconds

    found: dict[str, Any] = {}
    print(f"\ntraining beside a busy forked child ({steps} steps each):")
    for label, nice in (("alone", None), ("child at niceness 19", 19), ("child at the parent's priority", 0)):
        child = None if nice is None else ForkedCall(_svds_forever, nice=nice)
        start = time.perf_counter()
        step = run_variant("none", config, data, steps, seed)["step"]
        share = None
        if child is not None:
            share = (process_cpu_seconds(child.pid) or 0.0) / (time.perf_counter() - start)
            child.cancel()
        found[label] = {"step_ms": step * 1e3, "child_share_of_a_core": share}
        beside = "" if share is None else f"; the child had {share * 100:.1f}% of a core"
        print(f"  {label:32s} median step {step * 1e3:6.1f} ms{beside}")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per variant")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants (alternating order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 repeat")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="one device of this kind")
    parser.add_argument("--precision", default=None, help="default: 32-true on CPU, bf16-mixed on CUDA")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the config's)")
    parser.add_argument("--probe-tokens", type=int, default=None, help="GeometryMonitor's max_tokens (default 256)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time (CPU only)"
    )
    parser.add_argument("--parts", action="store_true", help="also time each part of one layer's probe")
    parser.add_argument(
        "--contention",
        action="store_true",
        help="also time training beside a busy forked child at niceness 19 and at the parent's priority",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["none", "router", "geometry"],
        help="which runs to compare (none is always run): no monitor, RouterMonitor(), GeometryMonitor(), and "
        "shipped, the config's own GeometryMonitor (default: all but shipped)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 40, 1
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu times the host only: use it with --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global CLOCK
    args = parse_args(argv)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config()
    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    data_args = dict(config["data"]["init_args"])
    data_args.update({k: v for k, v in (("block_size", args.block_size), ("batch_size", args.batch_size)) if v})
    data = WikiTextDataModule(**data_args)
    data.prepare_data()
    data.setup("fit")

    load = os.getloadavg()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"config {CONFIG.relative_to(ROOT)}; {args.steps} steps x {args.repeats} repeats on {device}, "
        f"{args.precision}; torch threads {torch.get_num_threads()}; {args.clock} clock; load average before: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    variants = ["none", *(v for v in args.variants if v != "none")]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    on = {"device": args.device, "precision": args.precision, "probe_tokens": args.probe_tokens}
    run_variant("none", config, data, min(args.steps, 10), args.seed, **on)  # warm-up: allocator, kernels, data
    for r in range(args.repeats):
        for name in variants if r % 2 == 0 else variants[::-1]:
            result = run_variant(name, config, data, args.steps, args.seed, **on)
            results[name].append(result)
            print(
                f"  round {r}: {name:9s} wall {result['wall']:7.2f}s  median step {result['step'] * 1e3:6.1f} ms  "
                f"monitor calls {len(result['calls'])} ({sum(result['calls']):.2f}s)"
            )
    summary = summarise(results, args.steps, shipped_cadence(config))
    if args.parts:
        summary["parts_s"] = time_parts(config, data, args.seed, args.probe_tokens or 256)
    if args.contention:
        summary["contention"] = contention(config, data, min(args.steps, 80), args.seed)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"device": device, "torch": torch.__version__, "settings": settings, **summary, "runs": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
