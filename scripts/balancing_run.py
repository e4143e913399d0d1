"""Load balance of the DeepSeek-V3 routing config under three balancing modes, on the same seed: a short CPU run.

Trains ``configs/transformer/wikitext_deepseek.yaml`` (15 sigmoid top-3 experts, one shared expert) with
``load_balancing`` set to ``none``, ``aux_loss`` and ``aux_free``, the three side by side with one torch thread
each and only the RouterMonitor, then prints the markdown table of docs/training.md from their CSV logs.

Usage:
    python scripts/balancing_run.py --steps 300 --out runs/balancing
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "aux_loss", "aux_free")


def fit(mode: str, steps: int, out: Path) -> subprocess.Popen:
    callbacks = out / "router_only.yaml"
    callbacks.write_text("trainer:\n  callbacks:\n    - class_path: moe_lightning.callbacks.RouterMonitor\n")
    command = [sys.executable, "-m", "moe_lightning.commands", "fit"]
    for config in ("configs/transformer/wikitext_deepseek.yaml", "configs/trainer/cpu.yaml", str(callbacks)):
        command += ["--config", config]
    command += [
        f"--model.init_args.config.load_balancing={mode}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={out / mode}",
        "--trainer.logger.name=",
        "--trainer.enable_progress_bar=false",
        "--summary=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    log = open(out / f"{mode}.log", "w")  # noqa: SIM115 - the child process holds it open until it exits
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def table(out: Path, steps: int) -> str:
    late_from, loss_from = 2 * steps // 3, steps - steps // 6
    lines = [
        f"| load_balancing | load_cv, step 0 | step {steps // 3} | steps {late_from}+ (mean) | utilisation_max | "
        f"dead_fraction | diversity | bias_range | train/task_loss, steps {loss_from}+ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        frame = pd.read_csv(out / mode / "version_0" / "metrics.csv")
        router = frame.dropna(subset=["router/mean/load_cv"]).set_index("step")
        late = router.loc[router.index >= late_from]
        loss = frame.dropna(subset=["train/task_loss"]).set_index("step")["train/task_loss"]
        bias = f"{late['router/mean/bias_range'].mean():.3f}" if "router/mean/bias_range" in router else "–"
        lines.append(
            f"| `{mode}` | {router['router/mean/load_cv'][0]:.3f} | {router['router/mean/load_cv'][steps // 3]:.3f} | "
            f"{late['router/mean/load_cv'].mean():.3f} | {late['router/mean/utilisation_max'].mean():.2f} | "
            f"{late['router/mean/dead_fraction'].mean():.3f} | {late['router/mean/diversity'].mean():.3f} | {bias} | "
            f"{loss[loss.index >= loss_from].mean():.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/balancing"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    processes = {mode: fit(mode, args.steps, args.out) for mode in MODES}
    failed = [mode for mode, process in processes.items() if process.wait() != 0]
    if failed:
        sys.exit(f"failed: {failed}; see {args.out}/<mode>.log")
    print(table(args.out, args.steps))


if __name__ == "__main__":
    main()
