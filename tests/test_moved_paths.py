"""What 0.1 wrote still loads: its module paths import as the modules that replaced them, with one FutureWarning
naming the new path, and a 0.1 checkpoint, fit config and sweep (``tests/assets/v0_1_0``) load and give the values
0.1 gave."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moe_lightning.commands import main as cli_main
from moe_lightning.commands.report import main as report_main
from moe_lightning.common.moved import MOVED
from moe_lightning.lightning import CausalLMModule, MLPMoEModule
from moe_lightning.nn import MLPMoEConfig

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "assets" / "v0_1_0"


def fresh_import(name: str) -> tuple[object, list[warnings.WarningMessage]]:
    """Import ``name`` as a first import would (the old path forgotten), recording the warnings."""
    for key in [key for key in sys.modules if key == name or key.startswith(f"{name}.")]:
        if key in MOVED:
            del sys.modules[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_with_a_warning_naming_it(old):
    module, caught = fresh_import(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the alias leaves the module's own spec in place
    assert [str(w.message).split(";")[0] for w in caught if str(w.message).startswith(old + " ")] == [
        f"{old} has moved to {MOVED[old]}"
    ]


def test_every_old_path_points_at_a_module_that_exists():
    for new in MOVED.values():
        assert importlib.util.find_spec(new) is not None, new


def test_a_path_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError, match="moe_lightning.no_such_module"):
        importlib.import_module("moe_lightning.no_such_module")


@pytest.mark.parametrize(
    ("module_class", "checkpoint", "model_input", "expected"),
    [
        (MLPMoEModule, "mlp_topk.ckpt", "mlp_input", "mlp_output"),
        (CausalLMModule, "causal_lm.ckpt", "lm_input", "lm_output"),
    ],
)
def test_a_checkpoint_written_by_0_1_loads_and_computes_what_it_did(module_class, checkpoint, model_input, expected):
    """The checkpoint's hyperparameters pickle ``moe_lightning.models.*Config``; Lightning loads it with
    ``weights_only=True``, which allows those names, and the hyperparameters hold the new classes."""
    module = module_class.load_from_checkpoint(OLD / checkpoint, map_location="cpu", weights_only=True).eval()
    assert type(module.hparams["config"]).__module__ == "moe_lightning.nn.models"
    saved = torch.load(OLD / "outputs.pt")
    with torch.no_grad():
        output = module.model(saved[model_input]).output
    # float32's default tolerances: another CPU's kernels round differently (outputs 2.4e-7 apart between two x86
    # hosts), while a wrong weight or config moves the outputs by their own size
    torch.testing.assert_close(output, saved[expected])


def test_a_0_1_checkpoint_also_unpickles_in_full_through_the_old_path():
    """``weights_only=False`` imports the pickled module path itself: the old path, with its warning."""
    sys.modules.pop("moe_lightning.models", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = torch.load(OLD / "mlp_topk.ckpt", weights_only=False)
    assert any("moe_lightning.models has moved to moe_lightning.nn.models" in str(w.message) for w in caught)
    assert type(checkpoint["hyper_parameters"]["config"]) is MLPMoEConfig


def test_a_0_1_fit_config_still_trains(tmp_path, monkeypatch):
    """LightningCLI's saved config of a 0.1 run names ``moe_lightning.modules.MLPMoEModule``; it fits again."""
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("moe_lightning.modules", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(
            [
                "fit",
                "--config",
                str(OLD / "sweep" / "topk-seed0" / "config.yaml"),
                "--trainer.max_steps=2",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert any("moe_lightning.modules has moved to moe_lightning.lightning.modules" in str(w.message) for w in caught)
    (checkpoint,) = tmp_path.glob("*-topk/checkpoints/epoch=*.ckpt")  # the run folder under default_root_dir
    trained = torch.load(checkpoint, weights_only=False)
    assert trained["global_step"] == 2
    assert MLPMoEModule.load_from_checkpoint(checkpoint).hparams["config"].routing == "topk"


def test_old_paths_of_the_logger_and_strategy_resolve_in_a_config(tmp_path):
    from moe_lightning.commands.trainer import MoELightningCLI
    from moe_lightning.lightning import AutoWandbLogger, ExpertParallelStrategy

    config = {
        "trainer": {
            "accelerator": "cpu",
            "strategy": {"class_path": "moe_lightning.strategy.ExpertParallelStrategy"},
            "logger": [
                {
                    "class_path": "moe_lightning.loggers.AutoWandbLogger",
                    "init_args": {"offline": True, "save_dir": str(tmp_path)},
                }
            ],
        },
        "model": {"class_path": "moe_lightning.lit.MLPMoEModule"},
        "data": {"class_path": "moe_lightning.data.SyntheticMoEDataModule"},
    }
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cli = MoELightningCLI(args=["--config", str(path)], run=False)
    assert type(cli.trainer.strategy) is ExpertParallelStrategy
    assert type(cli.trainer.loggers[0]) is AutoWandbLogger
    assert type(cli.model) is MLPMoEModule


def test_a_0_1_sweep_reports_the_tables_0_1_wrote(tmp_path):
    out = tmp_path / "report"
    assert report_main([str(OLD / "sweep"), "--out", str(out), "--format", "csv"]) == 0
    for name in os.listdir(OLD / "expected"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(OLD / "expected" / name), rtol=1e-12)


@pytest.mark.parametrize(
    ("old", "usage"),
    [("moe_lightning.cli", "usage: moe-lightning "), ("moe_lightning.sweep", "usage: moe-lightning sweep")],
)
def test_python_dash_m_on_an_old_path_runs_the_new_command(old, usage):
    import subprocess

    result = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)
    assert f"FutureWarning: {old} has moved to {MOVED[old]}" in result.stderr
