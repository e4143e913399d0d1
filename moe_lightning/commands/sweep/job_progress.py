"""The callback of every sweep job that writes its progress for the sweep (:mod:`moe_lightning.commands.sweep.progress`
reads it)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from moe_lightning.commands.sweep.progress import PROGRESS_FILE


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
