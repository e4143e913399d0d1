"""One folder per run: two runs of the same config get two folders, a resume continues its folder, its W&B run and
its history, the commands that read runs take the parent of both, and nothing is written outside the folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from moe_lightning import commands as cli
from moe_lightning.analysis.discover import WANDB_ID_FILE, discover_runs
from moe_lightning.analysis.log_dirs import read_metrics_csv
from moe_lightning.commands import run_folder
from moe_lightning.commands.run_folder import new_run_dir
from moe_lightning.lightning.loggers import continue_csv_log

ROOT = Path(__file__).resolve().parents[2]
LAYER = "geometry/blocks.0.ffn"
TINY = """
trainer:
  max_steps: 2
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: moe_lightning.callbacks.GeometryMonitor
      init_args: {every_n_steps: 2, max_tokens: 32, log_media: false}
model:
  init_args:
    config: {input_dim: 8, output_dim: 8, dim: 16, expert_hidden: 8, num_experts: 4}
data:
  init_args: {input_dim: 8, output_dim: 8, num_clusters: 4, num_train: 256, num_val: 64, batch_size: 32}
"""


def run(argv: list[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``moe-lightning *argv`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``make demo`` twice, cut to 2 steps (W&B offline), run from an empty folder, then the first run continued
    to 4 steps from its ``last.ckpt``: ``(the working folder, [first, second run folder], [their fit outputs])``."""
    import wandb

    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "tiny.yaml").write_text(TINY)
    work = tmp / "work"
    work.mkdir()
    fit = ["fit", "--config", str(ROOT / "configs/mlp/topk.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    fit += ["--config", str(tmp / "tiny.yaml")]
    saved_env, saved_cwd, threads = os.environ.get("WANDB_MODE"), os.getcwd(), torch.get_num_threads()
    os.environ["WANDB_MODE"], _ = "offline", os.chdir(work)
    torch.set_num_threads(1)
    try:
        first = run([*fit, "--summary=false"])  # the resumed start below writes the report
        second = run([*fit, "--summary=false"])
        folders = sorted((work / "runs").iterdir())
        config = f"runs/{folders[0].name}/config.yaml"
        resumed = run(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps=4", "--summary=true"])
    finally:
        wandb.teardown()
        torch.set_num_threads(threads)
        os.chdir(saved_cwd)
        if saved_env is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = saved_env
    return work, folders, [first, second, resumed]


@pytest.mark.integration  # `moe-lightning fit`, three times
def test_two_runs_get_two_folders_and_nothing_is_written_beside_them(runs):
    work, folders, outputs = runs
    assert [code for code, _, _ in outputs] == [0, 0, 0], [err[-2000:] for _, _, err in outputs]
    assert sorted(os.listdir(work)) == ["runs"]
    # Two runs started within the same second share a time stamp; the second then takes the ``-2`` suffix.
    names = [re.fullmatch(r"(\d{8}-\d{6})-topk(-2)?", folder.name) for folder in folders]
    assert all(names), [folder.name for folder in folders]
    stamps, suffixes = [name[1] for name in names], [name[2] for name in names]
    assert suffixes == [None, "-2" if stamps[0] == stamps[1] else None]
    for folder, (_, out, _) in zip(folders, outputs[:2], strict=True):
        lines = out.strip().splitlines()
        # The folder is named when the run starts and when it ends, with the command that continues it.
        assert lines[0] == f"Run folder: runs/{folder.name}"
        assert lines[-1] == (
            f"Run folder: runs/{folder.name} (continue: moe-lightning fit --config runs/{folder.name}/config.yaml "
            "--ckpt_path last)"
        )
        assert {"config.yaml", "checkpoints", "geometry", "wandb", WANDB_ID_FILE} <= set(os.listdir(folder))
        assert (folder / "checkpoints" / "last.ckpt").is_file()
    ids = [(folder / WANDB_ID_FILE).read_text().strip() for folder in folders]
    assert ids[0] != ids[1]


@pytest.mark.integration  # `moe-lightning fit`, three times
def test_a_resume_continues_the_folder_the_wandb_run_and_the_history(runs):
    work, (folder, _), (_, _, (code, out, err)) = runs
    assert code == 0, err[-2000:]
    assert out.splitlines()[0] == f"Run folder: runs/{folder.name} (continued)"
    run_id = (folder / WANDB_ID_FILE).read_text().strip()
    segments = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(segments) == 2  # one W&B run directory per start, both of the one run id
    assert all((segment / f"run-{run_id}.wandb").is_file() for segment in segments)
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    (joined,) = discover_runs([str(folder)])
    assert (joined.path, joined.status) == (str(folder), "done")
    trained = joined.history["train/loss"].dropna().index.tolist()
    assert trained == [0, 1, 2, 3]  # steps 0-1 from the first start, 2-3 from the resumed one
    assert joined.history[f"{LAYER}/tokens_total"].dropna().index.tolist()[::2] == [0, 4]
    assert sorted(p.name for p in (folder / "geometry").iterdir())[-1] == "step_0000004.json"
    # The end-of-fit summary and report read the joined history: the first probe of the first start, the last one
    # of the resumed start.
    table = [line.split() for line in out.splitlines() if line.startswith("blocks.0.ffn")]
    assert [int(row[1]) for row in table] == [0, 4]
    assert (folder / "report" / "index.html").is_file()


@pytest.mark.integration  # `moe-lightning fit`, three times
def test_report_and_dashboard_take_the_parent_of_both_runs(runs, monkeypatch):
    work, folders, _ = runs
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out, err = run(["dashboard", "runs", "--project", "moe-lightning", "--dry-run"])
    assert code == 0, err
    assert "Jacobian spectra per layer" in json.dumps(json.loads(out)["workspace"])
    code, out, _ = run(["dashboard", "runs", "--project", "moe-lightning"])  # offline: the spec is kept
    assert code == 1 and out.strip().endswith(f"the spec is in {Path('runs') / 'wandb-dashboard.json'}")
    code, _, err = run(["report", "runs", "--format", "md", "csv"])
    assert code == 0, err
    results = (work / "runs" / "report" / "results.md").read_text()
    # Both runs are read; the same routing and seed twice count once, and the report says which one is left out.
    assert "repeated seed" in results and f"runs/{folders[0].name}" in results
    assert sorted(os.listdir(work)) == ["runs"]
    written = sorted(os.listdir(work / "runs"))
    assert written == sorted([folders[0].name, folders[1].name, "report", "wandb-dashboard.json"])


@pytest.mark.integration  # `moe-lightning fit` (it stops before training)
def test_a_fresh_fit_into_a_folder_holding_a_run_is_refused(runs, monkeypatch):
    work, (_, folder), _ = runs
    monkeypatch.chdir(work)
    before = {path: sorted(os.listdir(path)) for path in (work / "runs", folder)}
    code, _, err = run(["fit", "--config", f"runs/{folder.name}/config.yaml"])  # no --ckpt_path: a fresh fit
    assert code == 2
    assert err.splitlines()[0] == (
        f"moe-lightning: error: run_dir: 'runs/{folder.name}' holds a run already; continue it with --ckpt_path "
        "last (or a checkpoint of its checkpoints/), or choose another --run_dir"
    )
    assert {path: sorted(os.listdir(path)) for path in before} == before


def test_a_taken_folder_name_gets_the_next_free_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.time, "strftime", lambda _: "20260101-000000")
    root = str(tmp_path / "runs")
    made = [new_run_dir("topk", root) for _ in range(3)]
    assert [os.path.basename(path) for path in made] == [
        "20260101-000000-topk",
        "20260101-000000-topk-2",
        "20260101-000000-topk-3",
    ]
    assert all(os.listdir(path) == [] for path in made)


def test_a_continued_csv_log_keeps_the_rows_before_the_resume(tmp_path):
    """Lightning's CSV writer deletes the metrics.csv it finds; a continued run appends to it instead, and a key
    new in the continued run widens the header."""
    first = CSVLogger(tmp_path, name="", version="")
    first.log_metrics({"loss": 1.0}, step=0)
    first.log_metrics({"loss": 0.5}, step=1)
    first.save()
    resumed = CSVLogger(tmp_path, name="", version="")
    continue_csv_log(resumed)
    resumed.log_metrics({"loss": 0.25, "val": 2.0}, step=2)
    resumed.save()
    history = read_metrics_csv(str(tmp_path / "metrics.csv"))
    assert history["loss"].to_dict() == {0: 1.0, 1: 0.5, 2: 0.25}
    assert history["val"].dropna().to_dict() == {2: 2.0}
