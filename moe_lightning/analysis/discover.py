"""Find training runs under a directory and load their scalar history, routing, seed and geometry reports.

Five layouts are understood (see ``docs/sweeps.md``):

1. a sweep job directory ``<sweep>/<routing>-seed<k>/`` with ``run.json`` (written by ``moe-lightning sweep``),
   plus ``metrics.csv`` or a ``wandb/`` run;
2. a plain CSV run directory: any directory holding ``metrics.csv`` (Lightning's ``CSVLogger``);
3. a TensorBoard log directory (``events.out.tfevents.*``);
4. a run folder of ``moe-lightning fit`` logged to W&B only: ``wandb-run-id.txt`` names its run, whose W&B run
   directories under ``wandb/`` (one per start: a resumed run has several) are read as one history;
5. a W&B run directory (``run-<id>.wandb``).

The CSV and TensorBoard loaders are :mod:`moe_lightning.analysis.log_dirs`, the W&B one
:mod:`moe_lightning.analysis.wandb_runs`. A directory that holds ``metrics.csv`` is read from the CSV only, never
also from a W&B run below it.
"""

from __future__ import annotations

import glob
import json
import os
import warnings

from moe_lightning.analysis.log_dirs import RunLogWarning, load_csv_run, load_tensorboard_run, tensorboard_files
from moe_lightning.analysis.run import DATA_SEED_NOTE, Run, check_routing, seed_value
from moe_lightning.analysis.wandb_runs import load_wandb_run, wandb_file, wandb_segments

# The W&B run id of a run folder of `moe-lightning fit`: the run it continues when resumed.
WANDB_ID_FILE = "wandb-run-id.txt"
REPEATED = "repeated seed"


def discover_runs(directories: list[str]) -> list[Run]:
    """Find every run under the given directories (recursively) and load it.

    Args:
        directories: run directories or directories containing runs, at any depth.

    Returns:
        The runs, in path order; runs that could not be read have a ``status`` other than ``"done"`` and each
        unreadable one is named in a :class:`~moe_lightning.analysis.log_dirs.RunLogWarning`; of distinct runs
        with the same family, arm and seed all but the last have status ``"repeated seed"``.

    Raises:
        ValueError: a directory does not exist or contains no run, no run could be read, or one run is found twice.
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
            elif WANDB_ID_FILE in filenames and (segments := wandb_segments(dirpath, _read_id(dirpath))):
                found.append(load_wandb_run(dirpath, segments))
            elif wandb_file(dirpath) is not None:
                found.append(load_wandb_run(dirpath))
            else:
                continue
            dirnames[:] = []  # a run's own subdirectories (geometry/, wandb/) hold no further runs
        if not found:
            raise ValueError(
                f"no runs found in {root!r}: expected, at any depth, a sweep job directory with run.json, a "
                "directory with metrics.csv (CSVLogger), a TensorBoard log directory with events.out.tfevents.*, a "
                f"run folder of moe-lightning fit ({WANDB_ID_FILE} and wandb/), or a W&B run directory with "
                "run-<id>.wandb"
            )
        runs.extend(found)
    _check_readable(runs)
    _leave_out_repeats(runs)
    return runs


def _read_id(folder: str) -> str:
    with open(os.path.join(folder, WANDB_ID_FILE)) as handle:
        return handle.read().strip()


def _leave_out_repeats(runs: list[Run]) -> None:
    """One run per (family, arm, seed) enters the statistics, which count seeds: of distinct runs sharing one (a run
    repeated, such as ``make demo`` twice), the last in path order (the newest of ``runs/<date>-<time>-...``
    folders) is kept and the others are left out with a note.

    Raises:
        ValueError: the same run was found twice (a directory and its parent both given).
    """
    seen: dict[tuple[str | None, str | None, int], Run] = {}
    for run in runs:
        if not run.ok or run.seed is None:
            continue
        key = (run.family, run.arm, run.seed)
        what = f"routing={run.routing!r}" if run.arm == run.routing else f"arm={run.arm!r}"
        earlier = seen.get(key)
        if earlier is not None and os.path.realpath(earlier.path) == os.path.realpath(run.path):
            raise ValueError(
                f"two runs with {what} and seed={run.seed} are one run found twice: {earlier.path!r} and "
                f"{run.path!r}; pass each directory once"
            )
        if earlier is not None:
            earlier.status = REPEATED
            earlier.note = f"{what} and seed={run.seed} again in {run.path} (the later run is the one counted)"
        seen[key] = run


def _check_readable(runs: list[Run]) -> None:
    """Warn about each run whose log could not be read; fail when none could."""
    if runs and all(run.source == "none" for run in runs):
        listed = "; ".join(_fault(run) for run in runs)
        raise ValueError(f"no run could be read ({len(runs)} found): {listed}")
    for run in runs:
        if run.status == "unreadable":
            warnings.warn(f"an unreadable run is left out: {_fault(run)}", RunLogWarning, 3)


def _fault(run: Run) -> str:
    """What is wrong with a run, naming its file (the CSV loader's notes name it already)."""
    note = run.note or run.status
    return note if run.path in note else f"{run.path!r}: {note}"


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
