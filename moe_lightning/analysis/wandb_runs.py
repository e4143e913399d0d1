"""W&B run directories (``.../wandb/offline-run-<time>-<id>/`` with ``run-<id>.wandb``): the history and the
config are read from the ``.wandb`` transaction log (:mod:`moe_lightning.analysis.wandb_records`)."""

from __future__ import annotations

import glob
import os

from moe_lightning.analysis.run import (
    DATA_SEED_NOTE,
    Run,
    capacity_match_of,
    check_routing,
    family_from_hparams,
    read_yaml,
    seed_value,
)
from moe_lightning.analysis.wandb_records import read_wandb_run


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


def load_wandb_run(directory: str) -> Run:
    """A W&B run directory (``run-<id>.wandb`` and ``files/``)."""
    run = Run(path=directory, source="wandb")
    path = wandb_file(directory)
    assert path is not None
    try:
        content = read_wandb_run(path)
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
    files_config = read_yaml(os.path.join(directory, "files", "config.yaml"))
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
    geometry = os.path.join(directory, "files", "geometry")
    run.geometry_dir = geometry if os.path.isdir(geometry) else None
    check_routing(run)
    return run
