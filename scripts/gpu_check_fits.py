"""The fits of the GPU run (scripts/gpu_check.py): every shipped model config through ``moe-lightning fit`` for a few
steps, with GeometryMonitor, RouterMonitor and CurvatureMonitor attached and a CSV logger, in one process (each
fit in-process, so that Lightning and the CLI load once).

Each config gets ``--config configs/trainer/<preset>.yaml`` and an overlay config written into the output folder
(steps, monitors, logger), and a run folder ``<out>/<config name>/``. A config whose data must be downloaded (a
``WikiTextDataModule`` without ``train_file``) is skipped with status ``needs download``: the GPU image has no
network. Writes ``<out>/fits.json``: per config its status, seconds, steps, last ``train/loss`` and how many
``geometry/``, ``router/`` and ``curvature/`` columns its ``metrics.csv`` holds.

Usage::

    python scripts/gpu_check_fits.py OUT --trainer gpu --steps 4                 # bf16-mixed on one GPU
    python scripts/gpu_check_fits.py OUT --trainer cpu --steps 2 --tiny         # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITOR_PREFIXES = ("geometry/", "router/", "curvature/")


def shipped_configs() -> list[Path]:
    """The model configs a user passes to ``moe-lightning fit --config`` (the trainer presets and the sweep presets
    are not fit configs of their own)."""
    return sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name not in ("trainer", "sweep"))


def needs_download(config: dict[str, Any]) -> bool:
    """Whether the config's data module loads a dataset from the hub (a WikiText module without ``train_file``)."""
    data = config.get("data") or {}
    init = data.get("init_args") or {}
    return str(data.get("class_path", "")).endswith("WikiTextDataModule") and not init.get("train_file")


def overlay(steps: int, tiny: bool) -> dict[str, Any]:
    """The config layered last: ``steps`` optimiser steps, the three monitors (each at fit start, mid-way and at
    fit end), one validation batch, a CSV logger. ``tiny`` (the CPU rehearsal) probes only at fit start and end,
    on fewer tokens, with a few Hessian products."""
    every = steps if tiny else max(1, steps // 2)
    curvature = {"every_n_steps": every, "density": not tiny}
    if tiny:
        curvature.update(eigen_max_iter=3, trace_max_samples=2)
    return {
        "trainer": {
            "max_steps": steps,
            "max_epochs": None,
            "val_check_interval": steps,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}},
            "callbacks": [
                {
                    "class_path": "moe_lightning.callbacks.GeometryMonitor",
                    "init_args": {"every_n_steps": every, "max_tokens": 16 if tiny else 256},
                },
                {"class_path": "moe_lightning.callbacks.RouterMonitor", "init_args": {"log_every_n_steps": 1}},
                {"class_path": "moe_lightning.callbacks.CurvatureMonitor", "init_args": curvature},
            ],
        }
    }


def tiny_overrides(config: dict[str, Any]) -> list[str]:
    """Command-line overrides that shrink a config for the CPU rehearsal: smaller batches, and for a transformer
    short sequences and width 32 (the layers, experts and routing stay the config's)."""
    if "max_seq_len" not in model_config(config):
        return ["--data.init_args.batch_size=32"]
    sizes = {"data.init_args.block_size": 32, "data.init_args.batch_size": 4, "model.init_args.config.max_seq_len": 32}
    sizes.update({"model.init_args.config.dim": 32, "model.init_args.config.expert_hidden": 32})
    return [f"--{key}={value}" for key, value in sizes.items()]


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    return ((config.get("model") or {}).get("init_args") or {}).get("config") or {}


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def summarise(run_dir: Path) -> dict[str, Any]:
    """The figures of one finished fit, read back from its ``metrics.csv``."""
    columns, rows = read_metrics(run_dir)
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    steps = [int(row["step"]) for row in rows if row.get("step")]
    keys = {prefix.rstrip("/"): sum(c.startswith(prefix) for c in columns) for prefix in MONITOR_PREFIXES}
    return {"steps_logged": max(steps) + 1 if steps else 0, "last_loss": losses[-1] if losses else None, "keys": keys}


def fit_one(config_path: Path, out: Path, trainer: str, overlay_path: Path, extra: list[str], tiny: bool) -> dict:
    """One ``moe-lightning fit``, in this process; its status never raises."""
    from moe_lightning.commands.trainer import main as fit_main

    config = yaml.safe_load(config_path.read_text())
    name = f"{config_path.parent.name}-{config_path.stem}"
    result: dict[str, Any] = {"config": str(config_path.relative_to(ROOT)), "name": name, "run_dir": str(out / name)}
    if needs_download(config):
        return {**result, "status": "needs download", "seconds": 0.0}
    argv = ["fit", "--config", str(config_path), "--config", str(ROOT / "configs" / "trainer" / f"{trainer}.yaml")]
    argv += ["--config", str(overlay_path), "--run_dir", str(out / name), *(tiny_overrides(config) if tiny else [])]
    argv += extra
    result["command"] = "moe-lightning " + " ".join(argv)
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        print(result["command"], flush=True)
        try:
            fit_main(argv)
            status = "ok"
        except SystemExit as error:
            status = f"failed (exit {error.code})"
        except Exception:  # noqa: BLE001 - one config's failure is recorded, the next one runs
            traceback.print_exc()
            status = "failed"
    result["seconds"] = time.perf_counter() - start
    if status == "ok":
        try:
            result.update(summarise(out / name))
        except (OSError, ValueError, KeyError) as error:
            status = f"failed (no metrics: {error})"
    # a dense config has no router: RouterMonitor has nothing to log there
    expected = [k for k in result.get("keys", {}) if k != "router" or model_config(config).get("routing") != "dense"]
    missing = [k for k in expected if not result["keys"][k]]
    if status == "ok" and missing:
        status = "failed (no " + ", ".join(missing) + " keys in metrics.csv)"
    result["status"] = status
    if status != "ok":
        result["log_tail"] = log.read_text().splitlines()[-15:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (one run folder and one log per config)")
    parser.add_argument("--trainer", default="gpu", help="trainer preset of configs/trainer/ (default: gpu)")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per fit")
    parser.add_argument("--tiny", action="store_true", help="tiny probes and sequences (the CPU rehearsal)")
    parser.add_argument("--configs", nargs="*", type=Path, default=None, help="default: every shipped config")
    args, extra = parser.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    overlay_path = args.out / "overlay.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay(args.steps, args.tiny), sort_keys=False))
    results = []
    for config_path in [p.resolve() for p in args.configs] if args.configs else shipped_configs():
        result = fit_one(config_path, args.out, args.trainer, overlay_path, extra, args.tiny)
        results.append(result)
        print(f"{result['name']}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
        # after every fit: a run stopped at its time limit still tells which configs passed
        (args.out / "fits.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] in ("ok", "needs download") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
