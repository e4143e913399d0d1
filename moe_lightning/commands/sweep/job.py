"""A sweep's jobs: one ``moe-lightning fit`` per (arm or variant, seed), its command line and the config the sweep
layers last on the preset's (``job.yaml``: seed, arm, loggers, overrides)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_lightning.commands.sweep.preset import ARM_ALIASES, ARMS, Preset

LOGGERS = ("csv", "wandb")


@dataclass
class Job:
    """One training run of a sweep."""

    routing: str
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.routing}-seed{self.seed}"


def plan_jobs(preset: Preset, out: str | Path) -> list[Job]:
    """Every job of ``preset`` under ``out/<preset.name>/``, routing-major."""
    root = Path(out).resolve() / preset.name
    return [Job(r, s, root / f"{r}-seed{s}") for r in preset.routings for s in preset.seeds]


def check_loggers(loggers: list[str]) -> list[str]:
    """Validated logger names in canonical order, with ``"csv"`` always included (``report`` reads it)."""
    bad = [name for name in loggers if name not in LOGGERS]
    if bad:
        raise ValueError(f"sweep: loggers {bad} not allowed; choose from {LOGGERS}")
    return sorted(set(loggers) | {"csv"}, key=LOGGERS.index)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_config(preset: Preset, job: Job, loggers: list[str], wandb_project: str) -> dict[str, Any]:
    """The config layered last on the preset's configs for ``job``."""
    logger_list: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(job.dir), "name": "", "version": ""},
        }
    ]
    if "wandb" in loggers:
        logger_list.append(
            {
                "class_path": "moe_lightning.lightning.loggers.AutoWandbLogger",
                "init_args": {
                    "save_dir": str(job.dir),
                    "project": wandb_project,
                    "name": f"{preset.name}/{job.name}",
                    "group": preset.name,
                    "tags": [preset.family, job.routing, f"seed{job.seed}"],
                },
            }
        )
    fixed: dict[str, Any] = {
        "seed_everything": job.seed,
        "run_dir": str(job.dir),  # the job's folder is its run folder: config, checkpoints, logs and reports
        "trainer": {"logger": logger_list, "enable_progress_bar": False},
    }
    arm = ARM_ALIASES.get(job.routing, job.routing)
    if arm in ARMS:  # a variant's routing comes from its own configs
        fixed["model"] = {"init_args": {"config": dict(ARMS[arm])}}
    variant = preset.variants.get(job.routing, {}).get("overrides", {})
    return _merge(_merge(_merge(preset.overrides, variant), preset.routing_overrides.get(job.routing, {})), fixed)


# Appended to the callbacks of every job's configs: the job's step, for the sweep's progress lines.
PROGRESS_CALLBACK = "--trainer.callbacks+=moe_lightning.commands.sweep.job_progress.JobProgress"


def job_command(preset: Preset, job: Job) -> list[str]:
    """The ``moe-lightning fit`` command line of ``job``: the preset's configs, the variant's, ``job.yaml``, and the
    progress callback added to the callbacks they list."""
    command = [sys.executable, "-m", "moe_lightning.commands", "fit"]
    for config in [*preset.configs, *preset.variants.get(job.routing, {}).get("configs", [])]:
        command += ["--config", config]
    return command + ["--config", str(job.dir / "job.yaml"), PROGRESS_CALLBACK]
