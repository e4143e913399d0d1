"""A callback that kills its own process at a chosen step of a fresh fit, once a checkpoint exists: the interrupted
job of the sweep's resume test. SIGKILL, as a power cut or the kernel's out-of-memory killer would: nothing of the
fit gets to run after it (no ``finally``, no logger flush, no checkpoint)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAtStep(Callback):
    """SIGKILL the fit at the start of training step ``step`` if the fit started fresh (a resumed fit, which has a
    ``ckpt_path``, runs on) and its run folder holds ``checkpoints/last.ckpt``.

    Args:
        step: the ``trainer.global_step`` at which to kill.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if trainer.ckpt_path is None and trainer.global_step == self.step and last.is_file():
            os.kill(os.getpid(), signal.SIGKILL)
