"""``moe-lightning report`` on runs whose ``metrics.csv`` is empty or cut short: each unreadable run is named on
stderr, a file cut inside a row loses only that row, and a report of nothing is an error (exit 2, nothing written)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest

from moe_lightning.analysis.log_dirs import read_metrics_csv
from moe_lightning.commands import main

SWEEP = Path(__file__).resolve().parents[1] / "assets" / "v0_1_0" / "sweep"  # topk-seed0 and soft-seed0, done


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for job in ("topk-seed0", "soft-seed0"):
        shutil.copytree(SWEEP / job, root / job)
    return root


def report(root: Path, capsys) -> tuple[int, list[str], list[str]]:
    """``(exit code, stdout lines, stderr lines)`` of ``moe-lightning report ROOT`` (tables only)."""
    code = main(["report", str(root), "--format", "md", "csv"])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_an_empty_metrics_csv_is_named_and_the_other_runs_are_reported(runs, capsys):
    empty = runs / "topk-seed0" / "metrics.csv"
    empty.write_text("")
    code, out, err = report(runs, capsys)
    assert code == 0
    assert err == [f"moe-lightning: warning: an unreadable run is left out: {str(empty)!r} is empty"]
    assert sorted(Path(p).name for p in out) == ["results.csv", "results.md"]
    assert pd.read_csv(runs / "report" / "results.csv")["routing"].tolist() == ["soft"]


def test_nothing_readable_is_an_error_that_writes_nothing(runs, capsys):
    empty, cut = runs / "topk-seed0" / "metrics.csv", runs / "soft-seed0" / "metrics.csv"
    empty.write_text("")
    cut.write_text(cut.read_text()[:1000])  # inside the header line: no row survives
    code, out, err = report(runs, capsys)
    assert code == 2 and out == []
    assert err[0] == (
        f"moe-lightning: error: no run could be read (2 found): {str(cut)!r} holds an incomplete header line and no "
        f"rows (the file was cut short); {str(empty)!r} is empty"
    )
    assert not (runs / "report").exists()


def test_a_file_cut_inside_a_row_loses_that_row_only(runs, capsys):
    path = runs / "topk-seed0" / "metrics.csv"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rindex("\n") + 40])  # 40 characters into the last row
    rows = list(csv.DictReader(text.splitlines()[:-1]))  # the complete rows, read by the csv module
    code, _, err = report(runs, capsys)
    assert code == 0
    assert err == [
        f"moe-lightning: warning: {str(path)!r} ends in an incomplete line (the file was cut short); read without it"
    ]
    with pytest.warns(UserWarning, match="incomplete line"):
        history = read_metrics_csv(str(path))
    assert sorted(history.index) == sorted({int(row["step"]) for row in rows if row["step"]})
