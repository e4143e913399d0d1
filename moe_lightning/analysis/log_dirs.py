"""CSV and TensorBoard log directories: Lightning's ``CSVLogger`` (``metrics.csv``) and ``TensorBoardLogger``
(``<save_dir>/<name>/version_<n>/`` with ``events.out.tfevents.*``, read with TensorBoard's own event reader);
routing and seed come from the LightningCLI ``config.yaml`` next to the log, else from ``hparams.yaml``."""

from __future__ import annotations

import glob
import os

import pandas as pd

from moe_lightning.analysis.run import Run, describe_log_directory


def tensorboard_files(directory: str) -> list[str]:
    """The TensorBoard event files of ``directory``, sorted."""
    return sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))


def read_metrics_csv(path: str) -> pd.DataFrame:
    """Lightning ``metrics.csv`` as one row per step (the last non-null value of each column at that step)."""
    frame = pd.read_csv(path)
    if "step" not in frame.columns:
        raise ValueError(f"{path!r} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
    frame = frame.dropna(subset=["step"])
    frame["step"] = frame["step"].astype(int)
    return frame.groupby("step").last().sort_index()


def load_csv_run(directory: str) -> Run:
    """A directory with ``metrics.csv`` (and ``config.yaml``/``hparams.yaml``, ``geometry/``)."""
    run = Run(path=directory, source="csv")
    try:
        run.history = read_metrics_csv(os.path.join(directory, "metrics.csv"))
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        run.status, run.note, run.source = "unreadable", f"metrics.csv: {error}", "none"
    return describe_log_directory(run, directory)


def read_tensorboard_scalars(directory: str) -> pd.DataFrame:
    """Every scalar of the TensorBoard event files in ``directory`` as one row per step (the last value written at a
    step wins), read with TensorBoard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    columns: dict[str, dict[int, float]] = {}
    for path in tensorboard_files(directory):
        events = EventAccumulator(path, size_guidance={SCALARS: 0})  # 0: keep every event, not a sample
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            column = columns.setdefault(tag, {})
            for event in events.Scalars(tag):
                column[int(event.step)] = float(event.value)
    frame = pd.DataFrame(columns)
    frame.index = frame.index.astype(int)
    frame.index.name = "step"
    return frame.sort_index()


def load_tensorboard_run(directory: str) -> Run:
    """A ``TensorBoardLogger`` log directory (``events.out.tfevents.*``, ``hparams.yaml``, ``geometry/``)."""
    run = Run(path=directory, source="tensorboard")
    try:
        run.history = read_tensorboard_scalars(directory)
    except Exception as error:  # noqa: BLE001 - a corrupt event file: the run is listed as unreadable
        run.status, run.note, run.source = "unreadable", f"TensorBoard events: {error}", "none"
    return describe_log_directory(run, directory)
