"""A sweep job's progress, seen from the sweep: the job writes its step and its total to ``progress.json``
(:class:`JobProgress`, a callback the sweep adds to every job), and the sweep prints a line per running job at most
every few seconds (:class:`ProgressLines`).

Example of the lines::

    [3/20] topk-seed2: step 512/1024 (41 s)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

PROGRESS_FILE = "progress.json"


class JobProgress(Callback):
    """Write ``{"step": trainer.global_step, "total": the planned steps}`` to ``<directory>/progress.json`` at fit
    start, at most every ``every_n_seconds`` during training, and at fit end (rank zero; written to a temporary
    file and renamed, so a reader never sees half of it). It only reads the trainer's counters.

    Args:
        directory: where to write; None: the trainer's ``default_root_dir`` (the sweep sets it to the job's folder).
        every_n_seconds: the least time between two writes.
    """

    def __init__(self, directory: str | None = None, every_n_seconds: float = 2.0) -> None:
        self.directory = directory
        self.every_n_seconds = every_n_seconds
        self._last_write = -math.inf

    def _write(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        data = {"step": int(trainer.global_step), "total": int(total) if math.isfinite(total) else None}
        path = Path(self.directory or trainer.default_root_dir) / PROGRESS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        self._last_write = time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._last_write >= self.every_n_seconds:
            self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)


def read_progress(job_dir: Path) -> tuple[int, int | None] | None:
    """``(step, total)`` from a job's ``progress.json``; None before the job has written it."""
    try:
        data = json.loads((job_dir / PROGRESS_FILE).read_text())
        return int(data["step"]), None if data.get("total") is None else int(data["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ProgressLines:
    """The progress lines of the running jobs: one per job whose step has changed, at most every ``interval``
    seconds per job. The clock is passed in, so what is printed depends on the times given, not on the machine.

    Args:
        interval: the least time between two lines of one job, in seconds.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._shown: dict[str, tuple[float, int]] = {}  # job name -> (time of its last line, its step then)

    def lines(self, jobs: list[tuple[str, str, Path, float]], now: float) -> list[str]:
        """The lines due at ``now`` for ``jobs``, each ``(prefix "[k/n]", name, folder, start time)``."""
        due = []
        for prefix, name, folder, start in jobs:
            shown_at, shown_step = self._shown.get(name, (start, -1))
            progress = read_progress(folder)
            if progress is None or now - shown_at < self.interval or progress[0] == shown_step:
                continue
            step, total = progress
            due.append(f"{prefix} {name}: step {step}/{total if total is not None else '?'} ({now - start:.0f} s)")
            self._shown[name] = (now, step)
        return due
