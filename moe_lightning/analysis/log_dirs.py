"""CSV and TensorBoard log directories: Lightning's ``CSVLogger`` (``metrics.csv``) and ``TensorBoardLogger``
(``<save_dir>/<name>/version_<n>/`` with ``events.out.tfevents.*``, read with TensorBoard's own event reader);
routing and seed come from the LightningCLI ``config.yaml`` next to the log, else from ``hparams.yaml``."""

from __future__ import annotations

import glob
import io
import os
import warnings

import pandas as pd

from moe_lightning.analysis.run import Run, describe_log_directory


def tensorboard_files(directory: str) -> list[str]:
    """The TensorBoard event files of ``directory``, sorted."""
    return sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))


class RunLogWarning(UserWarning):
    """A run's log that could be read only in part, or not at all (the message names the file and what was wrong)."""


def read_metrics_csv(path: str) -> pd.DataFrame:
    """Lightning ``metrics.csv`` as one row per step (the last non-null value of each column at that step).

    A file cut short (it does not end with a newline, as CSVLogger always writes it) loses its incomplete last
    line, with a :class:`RunLogWarning` naming the file: that line's values may be cut short too.

    Raises:
        ValueError: the file is empty or not CSV, its header is incomplete or lacks ``step``, or it has no row with a
            step; the message names the file.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"{path!r} is empty")
    if not text.endswith("\n"):
        if "\n" not in text:
            raise ValueError(f"{path!r} holds an incomplete header line and no rows (the file was cut short)")
        text = text[: text.rindex("\n") + 1]
        warnings.warn(
            f"{path!r} ends in an incomplete line (the file was cut short); read without it", RunLogWarning, 2
        )
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path!r} is not a CSV file that pandas can parse: {error}") from None
    if "step" not in frame.columns:
        raise ValueError(f"{path!r} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
    frame = frame.dropna(subset=["step"])
    if frame.empty:
        raise ValueError(f"{path!r} has a header but no row with a step")
    frame["step"] = frame["step"].astype(int)
    return frame.groupby("step").last().sort_index()


def load_csv_run(directory: str) -> Run:
    """A directory with ``metrics.csv`` (and ``config.yaml``/``hparams.yaml``, ``geometry/``)."""
    run = Run(path=directory, source="csv")
    try:
        run.history = read_metrics_csv(os.path.join(directory, "metrics.csv"))
    except (ValueError, OSError) as error:
        run.status, run.note, run.source = "unreadable", str(error), "none"
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
