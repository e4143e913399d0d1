"""Without wandb and datasets (a GPU image that holds torch and Lightning and not them, say) the package imports and
trains: the default logger is then CSV, the bundled WikiText files load without datasets, and a W&B logger named in
the config fails with one line that says what to do."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from moe_lightning.commands import run_folder

ROOT = Path(__file__).resolve().parents[2]
# Run first in a fresh interpreter: a meta-path finder before every other makes both packages look uninstalled.
BLOCK = """
import sys

class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("wandb", "datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Uninstalled())
"""
FIT = """
import json
from moe_lightning.commands import main

codes = {}
for name, extra in (("wandb", ["--trainer.logger=moe_lightning.lightning.loggers.AutoWandbLogger"]), ("default", [])):
    try:
        main(ARGS + ["--run_dir", RUN_DIR + "-" + name] + extra)
        codes[name] = 0
    except SystemExit as error:
        codes[name] = error.code
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"wandb", "datasets"})
print("RESULT " + json.dumps({"codes": codes, "loaded": loaded}))
"""


def logger_config(class_path: str, **init_args) -> Namespace:
    return Namespace(trainer=Namespace(logger=Namespace(class_path=class_path, init_args=Namespace(**init_args))))


def test_without_wandb_a_wandb_logger_is_a_config_error_and_the_csv_default_says_so(monkeypatch):
    monkeypatch.setattr(run_folder, "wandb_installed", lambda: False)
    with pytest.raises(ValueError, match=r"AutoWandbLogger needs wandb, which is not installed; .*CSVLogger"):
        run_folder.check_wandb_loggers(logger_config("moe_lightning.lightning.loggers.AutoWandbLogger"))
    with pytest.warns(UserWarning, match="wandb is not installed: the run logs to CSV"):
        run_folder.check_wandb_loggers(logger_config("lightning.pytorch.loggers.CSVLogger", save_dir="runs"))
    monkeypatch.setattr(run_folder, "wandb_installed", lambda: True)
    run_folder.check_wandb_loggers(logger_config("moe_lightning.lightning.loggers.AutoWandbLogger"))  # no error


def test_a_finder_that_raises_counts_as_not_installed(monkeypatch):
    def find_spec(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(run_folder.importlib.util, "find_spec", find_spec)
    assert not run_folder.wandb_installed()


# A fit of the WikiText config through `moe-lightning fit` in a fresh interpreter: an integration test.
@pytest.mark.integration
def test_a_wikitext_fit_runs_with_wandb_and_datasets_uninstalled(tmp_path):
    args = ["fit", "--config", "configs/transformer/wikitext_topk.yaml", "--config", "configs/trainer/cpu.yaml"]
    args += ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"]
    args += ["--trainer.log_every_n_steps=1", "--trainer.enable_checkpointing=false", "--summary=false"]
    args += ["--data.init_args.block_size=32", "--data.init_args.batch_size=4", "--model.init_args.config.dim=32"]
    args += ["--model.init_args.config.expert_hidden=32", "--model.init_args.config.max_seq_len=32"]
    program = BLOCK + f"ARGS = {args!r}\nRUN_DIR = {str(tmp_path / 'run')!r}\n" + FIT
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_MODE", None)
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, run.stderr[-3000:]
    outcome = json.loads(result[0].removeprefix("RESULT "))
    assert outcome == {"codes": {"wandb": 2, "default": 0}, "loaded": []}, run.stderr[-3000:]
    assert (
        "moe-lightning: error: trainer.logger: moe_lightning.lightning.loggers.AutoWandbLogger needs wandb, which is "
        "not installed; install it (pip install wandb) or choose another logger, e.g. --trainer.logger=CSVLogger"
    ) in run.stderr
    assert "wandb is not installed: the run logs to CSV (metrics.csv in the run folder)" in run.stderr
    assert not (tmp_path / "run-wandb").exists()  # refused before anything was written
    with open(tmp_path / "run-default" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len([row for row in rows if row["train/loss"]]) == 2
    assert any(key.startswith("geometry/blocks.0.ffn/") and row[key] for row in rows for key in row)
