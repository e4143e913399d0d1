"""A sweep job's progress: the callback writes the trainer's step and planned total, and the sweep's lines follow
them, at most one per job per interval, with the clock given (no test depends on how fast this machine is)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.commands.sweep.job_progress import JobProgress
from moe_lightning.commands.sweep.progress import PROGRESS_FILE, ProgressLines, read_progress


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_writes_the_step_and_the_planned_total(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=8)  # 5 steps an epoch
    trainer = L.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=[JobProgress(every_n_seconds=0.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Tiny(), data)
    assert json.loads((tmp_path / PROGRESS_FILE).read_text()) == {"step": 10, "total": 10}
    assert read_progress(tmp_path) == (10, 10)


def _write(folder: Path, step: int, total: int | None) -> None:
    folder.mkdir(exist_ok=True)
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, "total": total}))


def test_progress_lines_follow_the_step_at_most_once_per_interval(tmp_path):
    topk, soft = tmp_path / "topk-seed0", tmp_path / "soft-seed0"
    jobs = [("[1/4]", "topk-seed0", topk, 100.0), ("[2/4]", "soft-seed0", soft, 100.0)]
    lines = ProgressLines(interval=10.0)
    assert lines.lines(jobs, now=150.0) == []  # no progress.json yet
    _write(topk, 120, 400)
    assert lines.lines(jobs, now=105.0) == []  # too soon after the start
    assert lines.lines(jobs, now=112.0) == ["[1/4] topk-seed0: step 120/400 (12 s)"]
    _write(topk, 200, 400)
    _write(soft, 3, None)
    assert lines.lines(jobs, now=115.0) == ["[2/4] soft-seed0: step 3/? (15 s)"]  # topk: too soon after its line
    assert lines.lines(jobs, now=122.0) == ["[1/4] topk-seed0: step 200/400 (22 s)"]
    assert lines.lines(jobs, now=140.0) == []  # no step has changed
    (soft / PROGRESS_FILE).write_text('{"step": ')  # unreadable: no line, no error
    assert read_progress(soft) is None and lines.lines(jobs, now=160.0) == []
