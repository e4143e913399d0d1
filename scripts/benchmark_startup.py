"""Time how long ``moe-lightning`` takes to answer: the top-level help, a usage error, ``report --help`` and the
report of one tiny run, each as a fresh interpreter (``python -m moe_lightning``), the median of a few runs.

``fit --help`` is the reference: LightningCLI's commands import Lightning (seconds) before they parse anything.
The report's tables alone (``--format md csv``) import pandas but not torch or the plotting libraries; the default
formats add the figures and the HTML page, which import torch (the saved reports as tensors), matplotlib and
plotly. The tiny run (the MLP top-k config for 20 steps with GeometryMonitor, logged to CSV) is trained once,
untimed.
``--root`` times another checkout's code, e.g. an older commit unpacked with ``git archive``.

    python scripts/benchmark_startup.py
    python scripts/benchmark_startup.py --runs 3 --no-report-run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = """
trainer:
  max_steps: 20
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{out}", name: "", version: ""}}
  callbacks:
    - class_path: moe_lightning.callbacks.GeometryMonitor
      init_args: {{every_n_steps: 10, max_tokens: 64}}
model:
  init_args:
    config: {{input_dim: 8, output_dim: 8, dim: 16, expert_hidden: 8, num_experts: 4, num_blocks: 2}}
data:
  init_args: {{input_dim: 8, output_dim: 8, num_clusters: 4, num_train: 512, num_val: 128, batch_size: 64}}
"""


def command(root: Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``python -m moe_lightning *args`` with ``root``'s package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "offline"}
    return [sys.executable, "-m", "moe_lightning", *args], env


def wall_times(root: Path, args: list[str], runs: int, expected: int) -> list[float]:
    """Wall-clock seconds of ``runs`` runs of the command, each checked for its exit code."""
    argv, env = command(root, args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != expected:
            raise SystemExit(f"`{' '.join(args)}` exited {result.returncode}, not {expected}:\n{result.stderr[-2000:]}")
    return times


def train_tiny_run(root: Path, out: Path) -> Path:
    """One short fit logged to CSV under ``out``; returns its log directory."""
    config = out / "tiny.yaml"
    config.write_text(TINY_RUN.format(out=out / "run"))
    args = ["fit", "--config", "configs/mlp/topk.yaml", "--config", "configs/trainer/cpu.yaml"]
    argv, env = command(root, [*args, "--config", str(config), "--summary=false"])
    subprocess.run(argv, env=env, cwd=root, check=True, capture_output=True)
    return out / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command; the table shows their median")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose moe_lightning is timed")
    parser.add_argument("--no-report-run", action="store_true", help="skip the report of a tiny run (and its fit)")
    args = parser.parse_args()
    root = args.root.resolve()
    cases = [
        ("moe-lightning --help", ["--help"], 0),
        ("moe-lightning nonsense (usage error)", ["nonsense"], 2),
        ("moe-lightning report --help", ["report", "--help"], 0),
        ("moe-lightning fit --help (LightningCLI)", ["fit", "--help"], 0),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_report_run:
            run = train_tiny_run(root, Path(tmp))
            report = ["report", str(run), "--out", f"{tmp}/report"]
            cases.append(("moe-lightning report RUN --format md csv", [*report, "--format", "md", "csv"], 0))
            cases.append(("moe-lightning report RUN (all formats)", report, 0))
        print(f"== Start-up of moe-lightning: median of {args.runs} runs, Python {sys.version.split()[0]} ==")
        print(f"{'command':44s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
        for name, argv, expected in cases:
            times = wall_times(root, argv, args.runs, expected)
            print(f"{name:44s} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")


if __name__ == "__main__":
    main()
