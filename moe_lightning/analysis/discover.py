"""Find training runs under a directory and load their scalar history, routing, seed and geometry reports.

Four layouts are understood (see ``docs/sweeps.md``):

1. a sweep job directory ``<sweep>/<routing>-seed<k>/`` with ``run.json`` (written by ``moe-lightning sweep``),
   plus ``metrics.csv`` or a ``wandb/`` run;
2. a plain CSV run directory: any directory holding ``metrics.csv`` (Lightning's ``CSVLogger``);
3. a TensorBoard log directory (``events.out.tfevents.*``);
4. a W&B run directory (``run-<id>.wandb``).

The CSV and TensorBoard loaders are :mod:`moe_lightning.analysis.log_dirs`, the W&B one
:mod:`moe_lightning.analysis.wandb_runs`. A directory that holds ``metrics.csv`` is read from the CSV only, never
also from a W&B run below it.
"""

from __future__ import annotations

import glob
import json
import os

from moe_lightning.analysis.log_dirs import load_csv_run, load_tensorboard_run, tensorboard_files
from moe_lightning.analysis.run import DATA_SEED_NOTE, Run, check_routing, seed_value
from moe_lightning.analysis.wandb_runs import load_wandb_run, wandb_file


def discover_runs(directories: list[str]) -> list[Run]:
    """Find every run under the given directories (recursively) and load it.

    Args:
        directories: run directories or directories containing runs, at any depth.

    Returns:
        The runs, in path order; runs that could not be read have a ``status`` other than ``"done"``.

    Raises:
        ValueError: a directory does not exist or contains no run, or two finished runs share routing, family and
            seed (they would be counted twice).
    """
    runs: list[Run] = []
    for root in directories:
        if not os.path.isdir(root):
            raise ValueError(f"{root!r} is not a directory; expected a run directory or a directory containing runs")
        found: list[Run] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "run.json" in filenames:
                found.append(load_sweep_job(dirpath))
            elif "metrics.csv" in filenames:
                found.append(load_csv_run(dirpath))
            elif tensorboard_files(dirpath):
                found.append(load_tensorboard_run(dirpath))
            elif wandb_file(dirpath) is not None:
                found.append(load_wandb_run(dirpath))
            else:
                continue
            dirnames[:] = []  # a run's own subdirectories (geometry/, wandb/) hold no further runs
        if not found:
            raise ValueError(
                f"no runs found in {root!r}: expected, at any depth, a sweep job directory with run.json, a "
                "directory with metrics.csv (CSVLogger), a TensorBoard log directory with events.out.tfevents.*, or "
                "a W&B run directory with run-<id>.wandb"
            )
        runs.extend(found)
    seen: dict[tuple[str | None, str | None, int], str] = {}
    for run in runs:
        if not run.ok or run.seed is None:
            continue
        key = (run.family, run.arm, run.seed)
        if key in seen:
            what = f"routing={run.routing!r}" if run.arm == run.routing else f"arm={run.arm!r}"
            raise ValueError(
                f"two runs with {what} and seed={run.seed}: {seen[key]!r} and {run.path!r}; "
                "pass directories that hold each (routing, seed) once"
            )
        seen[key] = run.path
    return runs


def load_sweep_job(directory: str) -> Run:
    """A sweep job directory: ``run.json`` plus ``metrics.csv`` or a ``wandb/`` run below it."""
    try:
        with open(os.path.join(directory, "run.json")) as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return Run(path=directory, source="none", status="unreadable", note=f"run.json: {error}")
    if os.path.isfile(os.path.join(directory, "metrics.csv")):
        run = load_csv_run(directory)
    else:
        wandb_dirs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(directory, "wandb", "*", "run-*.wandb")))
        if wandb_dirs:
            run = load_wandb_run(wandb_dirs[-1])
            run.path = directory
        else:
            run = Run(path=directory, source="none", status="no metrics", note="no metrics.csv and no W&B run")
    run.routing = meta.get("routing") or run.routing
    seed = seed_value(meta.get("seed"))
    if seed is not None:
        run.seed = seed
        run.note = "; ".join(part for part in run.note.split("; ") if part and not part.startswith(DATA_SEED_NOTE))
    run.family = meta.get("family") or run.family
    run.preset = meta.get("preset")
    if isinstance(meta.get("wall_s"), (int, float)):
        run.wall_s = float(meta["wall_s"])  # the job's process, start-up included
    status = meta.get("status", "unknown")
    if status != "done":
        run.status = str(status)
        returncode = meta.get("returncode")
        run.note = f"sweep status {status!r}" + (f", return code {returncode}" if returncode is not None else "")
    elif run.status == "unknown routing":
        run.status, run.note = "done", ""
    check_routing(run, variant=bool(meta.get("variant")))
    return run
