"""A W&B logger that never needs the network: offline automatically without credentials or connectivity."""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

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
