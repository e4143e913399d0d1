"""The end-of-fit summary: the table against the run's own metrics file, and the report it points to."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest

from moe_lightning.commands import main
from moe_lightning.commands.run_summary import format_summary, geometry_summary

ROOT = Path(__file__).resolve().parents[1]
SHORT_FIT = [
    "--config",
    str(ROOT / "configs/mlp/topk.yaml"),
    "--config",
    str(ROOT / "configs/trainer/cpu.yaml"),
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=12",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.callbacks+=moe_lightning.callbacks.RouterMonitor",
]


@pytest.fixture
def short_fit(tmp_path, monkeypatch) -> list[str]:
    """The demo's config, 12 steps, probing at fit start and every 5 steps, run from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    probes = tmp_path / "probes.yaml"
    probes.write_text(
        "trainer:\n  callbacks:\n    - class_path: moe_lightning.callbacks.GeometryMonitor\n"
        "      init_args: {every_n_steps: 5, max_tokens: 64}\n"
    )
    return [*SHORT_FIT[:4], "--config", str(probes), *SHORT_FIT[4:]]


def test_summary_rows_are_the_first_and_last_probe_with_the_router_value_before_them():
    layer = "blocks.0.ffn"
    history = pd.DataFrame(
        {
            f"geometry/{layer}/tokens_total": [256.0, None, None, 256.0, None],
            f"geometry/{layer}/jac_sigma_max/mean": [1.5, None, None, 2.5, None],
            f"geometry/{layer}/align_ratio": [1.0, None, None, 3.0, None],
            f"router/{layer}/load_cv": [None, 0.4, 0.3, None, 0.2],
        },
        index=pd.Index([0, 10, 20, 30, 40], name="step"),
    )
    rows = geometry_summary(history)
    assert [(r["layer"], r["step"]) for r in rows] == [(layer, 0), (layer, 30)]
    assert rows[0]["sigma_max"] == 1.5 and rows[1]["sigma_max"] == 2.5
    assert rows[0]["align/chance"] == 1.0 and rows[1]["align/chance"] == 3.0
    # Nothing logged at or before step 0: the first value after it; at step 30, the last one before (step 20).
    assert rows[0]["load_cv"] == 0.4 and rows[1]["load_cv"] == 0.3
    assert math.isnan(rows[0]["jac_eff_rank"])  # a key the run never logged
    table = format_summary(rows).splitlines()
    assert table[0].split() == ["layer", "step", "sigma_max", "jac_eff_rank", "pca_eff_rank", "align/chance", "load_cv"]
    assert table[2].split() == [layer, "0", "1.5", "-", "-", "1", "0.4"]


@pytest.mark.integration  # `moe-lightning fit`
def test_fit_prints_the_summary_of_its_csv_log_and_writes_the_report(short_fit, tmp_path, capsys):
    assert main(["fit", *short_fit, "--trainer.logger=CSVLogger"]) == 0
    out = capsys.readouterr().out
    (metrics_path,) = tmp_path.rglob("metrics.csv")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert metrics_path.parent == run_dir  # the CSV log is the run folder's
    with open(metrics_path) as handle:
        rows = list(csv.DictReader(handle))
    key = "geometry/blocks.0.ffn/jac_sigma_max/mean"
    probes = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    assert len(probes) >= 2  # fit start, and every 5 steps
    table = out[out.index("Geometry of each MoE layer") :].splitlines()
    printed = [line.split() for line in table if line.startswith("blocks.0.ffn")]
    assert [(int(p[1]), float(p[2])) for p in printed] == [
        (step, float(f"{value:.4g}")) for step, value in (probes[0], probes[-1])
    ]
    (index,) = [line.removeprefix("Report of the run: ") for line in out.splitlines() if "Report of the run" in line]
    assert index == str(Path("runs") / run_dir.name / "report" / "index.html")
    assert out.strip().splitlines()[-1].startswith(f"Run folder: {Path('runs') / run_dir.name} (continue: ")
    # The page is the run's dashboard: its geometry curves over training, drawn from the same log.
    assert 'data-kind="geometry" data-layer="blocks.0.ffn"' in Path(index).read_text()
    assert (Path(index).parent / "curves.png").is_file()


@pytest.mark.integration  # `moe-lightning fit`
def test_fit_with_the_default_wandb_logger_offline_ends_with_the_summary(short_fit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["fit", *short_fit]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (run_dir,) = (tmp_path / "runs").iterdir()
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")  # the W&B run lives in the run folder
    assert f"Report of the run: {Path('runs') / run_dir.name / 'report' / 'index.html'}" in lines
    assert lines[-1].startswith(f"Run folder: {Path('runs') / run_dir.name} (continue: ")
    assert (run_dir / "report" / "index.html").is_file()
    assert sum(line.startswith("blocks.0.ffn") for line in lines) == 2


@pytest.mark.integration  # `moe-lightning fit`
def test_summary_can_be_turned_off(short_fit, tmp_path, capsys):
    args = ["fit", *short_fit, "--summary=false", "--trainer.logger=CSVLogger"]
    assert main(args) == 0
    assert "Geometry of each MoE layer" not in capsys.readouterr().out
    assert not list(tmp_path.rglob("index.html"))
