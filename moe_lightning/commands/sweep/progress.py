"""A sweep job's progress, seen from the sweep: the job writes its step and its total to ``progress.json``
(:class:`~moe_lightning.commands.sweep.job_progress.JobProgress`, a callback the sweep adds to every job), and the
sweep prints a line per running job at most every few seconds (:class:`ProgressLines`). This module does not load
Lightning, so ``moe-lightning sweep --help`` answers without it.

Example of the lines::

    [3/20] topk-seed2: step 512/1024 (41 s)
"""

from __future__ import annotations

import json
from pathlib import Path

PROGRESS_FILE = "progress.json"


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
