"""W&B run directories (``.../wandb/offline-run-<time>-<id>/`` with ``run-<id>.wandb``): the history and the
config are read from the ``.wandb`` transaction log (:mod:`moe_lightning.analysis.wandb_records`)."""

from __future__ import annotations

import glob
import os

import pandas as pd

from moe_lightning.analysis.run import (
    DATA_SEED_NOTE,
    Run,
    capacity_match_of,
    check_routing,
    family_from_hparams,
    read_yaml,
    seed_value,
)
from moe_lightning.analysis.wandb_records import WandbRunContent, read_wandb_run


def wandb_file(directory: str) -> str | None:
    """The last ``run-<id>.wandb`` of ``directory``, or None."""
    files = sorted(glob.glob(os.path.join(directory, "run-*.wandb")))
    return files[-1] if files else None


def _seed_from_args(args: list[str]) -> int | None:
    """``--seed_everything=N`` or ``--seed_everything N`` on the recorded command line."""
    for index, arg in enumerate(args):
        if arg.startswith("--seed_everything="):
            return seed_value(arg.split("=", 1)[1])
        if arg == "--seed_everything" and index + 1 < len(args):
            return seed_value(args[index + 1])
    return None


def wandb_segments(folder: str, run_id: str) -> list[str]:
    """The W&B run directories of run ``run_id`` under ``<folder>/wandb/`` (one per start of the run: a resumed run
    has several), oldest first."""
    paths = glob.glob(os.path.join(folder, "wandb", f"*-{run_id}", f"run-{run_id}.wandb"))
    # <offline-run|run>-<YYYYMMDD_HHMMSS>-<id>: the start time orders the segments.
    return sorted((os.path.dirname(p) for p in paths), key=lambda d: os.path.basename(d).rsplit("-", 2)[-2:])


def _read_segments(segments: list[str]) -> WandbRunContent:
    """One run's content from its segments: the histories joined (a step logged again by a later segment takes the
    later value), the configs merged, the exit code and command line of the last segment."""
    contents = [read_wandb_run(path) for path in map(wandb_file, segments) if path is not None]
    if not contents:
        raise ValueError(f"no run-<id>.wandb in {segments}")
    last = contents[-1]
    if len(contents) == 1:
        return last
    history = pd.concat([c.history for c in contents]).groupby(level=0).last().sort_index()
    config: dict = {}
    for content in contents:
        config.update(content.config)
    media = set().union(*(c.media_keys for c in contents))
    return WandbRunContent(history, config, last.exit_code, last.args, media)


def load_wandb_run(directory: str, segments: list[str] | None = None) -> Run:
    """A W&B run directory (``run-<id>.wandb`` and ``files/``), or a run folder of ``moe-lightning fit`` whose run
    has the W&B run directories ``segments`` (its geometry in ``<directory>/geometry``)."""
    run = Run(path=directory, source="wandb")
    segments = segments or [directory]
    path = wandb_file(segments[-1])
    assert path is not None
    try:
        content = _read_segments(segments)
    except (ValueError, OSError) as error:
        run.status, run.note, run.source = "unreadable", f"{os.path.basename(path)}: {error}", "none"
        return run
    run.history, run.config, run.media_keys = content.history, content.config, content.media_keys
    run.wall_s = content.runtime_s
    if content.exit_code is None:
        run.status, run.note = "incomplete", "the W&B log has no exit record (still running, or killed)"
    elif content.exit_code != 0:
        run.status, run.note = "failed", f"exit code {content.exit_code}"
    config = content.config
    for segment in reversed(segments):
        files_config = read_yaml(os.path.join(segment, "files", "config.yaml"))
        for key, value in files_config.items():  # W&B's own files/config.yaml: {key: {"value": ...}}
            if isinstance(value, dict) and "value" in value:
                config.setdefault(key, value["value"])
    if isinstance(config.get("config"), dict):
        run.routing = config["config"].get("routing")
        run.capacity_match = capacity_match_of(config["config"])
    run.seed = seed_value(config.get("seed_everything"))
    if run.seed is None:
        run.seed = _seed_from_args(content.args)
    if run.seed is None and seed_value(config.get("seed")) is not None:
        # The W&B config holds the LightningModule's and DataModule's hyperparameters, not seed_everything.
        run.seed = seed_value(config.get("seed"))
        run.note = "; ".join(
            filter(None, [run.note, f"{DATA_SEED_NOTE} (no seed_everything in the W&B config or command line)"])
        )
    run.family = family_from_hparams(config)
    folders = [os.path.join(directory, "geometry"), *(os.path.join(d, "files", "geometry") for d in segments[::-1])]
    run.geometry_dir = next((folder for folder in folders if os.path.isdir(folder)), None)
    check_routing(run)
    return run
