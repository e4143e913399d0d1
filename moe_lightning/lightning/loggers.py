"""Loggers: a W&B logger that never needs the network (offline automatically without credentials or connectivity),
and a CSV history that a resumed run continues."""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from moe_lightning.common import tcp_reachable


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_offline(offline: bool | None = None) -> tuple[bool, str]:
    """Decide W&B offline mode: an explicit choice wins, then ``WANDB_MODE``, then credentials and network.

    Returns:
        ``(offline, reason)``.
    """
    if offline is not None:
        return offline, "set explicitly"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={mode}"
    if mode == "online":
        return False, "WANDB_MODE=online"
    if not _has_wandb_credentials():
        return True, "no W&B credentials (WANDB_API_KEY or ~/.netrc)"
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not tcp_reachable(base_url):
        return True, f"{base_url} is unreachable"
    return False, "credentials found and server reachable"


class AutoWandbLogger(WandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, offline automatically when there are no
    credentials or no network, so a run never crashes for want of either. Sync later with ``wandb sync``.

    Args:
        offline: force offline (True) or online (False); None decides automatically.
        **kwargs: passed to ``WandbLogger`` (``project``, ``name``, ``save_dir``, ...).
    """

    def __init__(
        self, offline: bool | None = None, project: str = "moe-lightning", save_dir: str = "runs", **kwargs: Any
    ) -> None:
        resolved, reason = resolve_wandb_offline(offline)
        if resolved and offline is None:
            warnings.warn(
                f"W&B runs offline ({reason}); sync later with `wandb sync {save_dir}/wandb/offline-*`", stacklevel=2
            )
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(offline=resolved, project=project, save_dir=save_dir, **kwargs)


def continue_csv_log(logger: Logger) -> None:
    """Let a :class:`~lightning.pytorch.loggers.CSVLogger` continue the ``metrics.csv`` of the run it resumes.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; the file is read first, put back, and
    the writer told its columns, so the resumed steps are appended (with the header widened when new keys appear)
    and the run keeps one history. Other loggers are left alone.
    """
    if not isinstance(logger, CSVLogger):
        return
    path = os.path.join(logger.log_dir, "metrics.csv")
    try:
        with open(path, newline="") as handle:
            saved = handle.read()
    except FileNotFoundError:
        return
    with warnings.catch_warnings():  # "previous log files will be deleted": they are put back below
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment
    if not hasattr(writer, "metrics_keys"):  # not rank zero: no writer
        return
    with open(path, "w", newline="") as handle:
        handle.write(saved)
    writer.metrics_keys = next(csv.reader(saved.splitlines()), [])


def finish_wandb_runs(loggers: list[Logger]) -> None:
    """Finish the W&B runs of ``loggers``, so that their ``.wandb`` logs are complete when the fit returns (the
    report reads them) and a later fit in the same process starts a run of its own."""
    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger) and logger._experiment is not None]
    if not wandb_loggers:
        return
    import wandb

    for logger in wandb_loggers:
        logger.experiment.finish()
    # finish() can return before the service has flushed the log's last records; teardown waits for it.
    wandb.teardown()


class CSVHistoryMark(Callback):
    """Keep each CSV logger's ``metrics.csv`` in step with the checkpoints, so a resumed run has one history.

    Why: a run killed after its last checkpoint has logged rows past it (Lightning writes a row as it logs it), and
    the resumed fit logs those steps again. At every checkpoint this callback writes the rows logged so far and
    records how many ``metrics.csv`` holds and the checkpoint's step (its ``state_dict``, saved in the checkpoint).
    Given that state on resume, it drops the rows written after the checkpoint, except those of earlier steps:
    Lightning logs the training metrics of the step that triggered the checkpoint just after saving it, and a resumed
    fit does not log them again. The fit command adds it to every run; it only reads and trims the log files.

    Args:
        loggers: the trainer's loggers; the :class:`~lightning.pytorch.loggers.CSVLogger` ones are kept in step.
    """

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = [logger for logger in loggers if isinstance(logger, CSVLogger)]
        self._trainer: Trainer | None = None

    def _paths(self) -> list[str]:
        return [os.path.join(logger.log_dir, "metrics.csv") for logger in self.loggers]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict, called when a checkpoint is saved, is given no trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"rows": [data rows of each CSV logger's metrics.csv, None where it has none], "step": the global step}``,
        after writing the rows logged so far (rank zero; elsewhere the counts are None)."""
        rows: list[int | None] = []
        step = 0 if self._trainer is None else self._trainer.global_step
        if rank_zero_only.rank != 0:
            return {"rows": [None] * len(self.loggers), "step": step}
        for logger, path in zip(self.loggers, self._paths(), strict=True):
            logger.save()
            try:
                with open(path, newline="") as handle:
                    rows.append(max(sum(1 for _ in csv.reader(handle)) - 1, 0))
            except FileNotFoundError:
                rows.append(None)
        return {"rows": rows, "step": step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Drop the rows of each ``metrics.csv`` written after the checkpoint at a step it had reached (rank zero,
        which writes the file)."""
        if rank_zero_only.rank != 0:
            return
        step = state_dict.get("step", 0)
        for path, keep in zip(self._paths(), state_dict.get("rows", []), strict=False):
            if keep is None or not os.path.isfile(path):
                continue
            with open(path, newline="") as handle:
                header, *rows = list(csv.reader(handle))
            if len(rows) <= keep or "step" not in header:
                continue
            column = header.index("step")
            later = [row for row in rows[keep:] if row[column] != "" and int(float(row[column])) < step]
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerows([header, *rows[:keep], *later])  # the dialect CSVLogger writes
