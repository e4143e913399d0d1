"""The ``moe-lightning`` dispatcher: the top-level help lists every command, a mistyped command or option is a usage
error, and these answers (and each project command's own help) come without importing Lightning, torch,
transformers, the plotting libraries or wandb, which LightningCLI's commands load when they run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lightning import commands as cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "torch", "transformers", "matplotlib", "plotly", "pandas", "wandb")
# Run `main(argv)` in a fresh interpreter; report its exit code and which heavy packages it imported.
RUNNER = """
import json, sys
from moe_lightning.commands import main
argv, heavy, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
try:
    code = main(argv)
except SystemExit as exit_:
    code = exit_.code
with open(out, "w") as handle:
    json.dump({"code": code, "imported": [name for name in heavy if name in sys.modules]}, handle)
"""


def run_fresh(argv: list[str], tmp_path: Path) -> tuple[int, list[str], str, str]:
    """``(exit code, heavy packages imported, stdout, stderr)`` of ``moe-lightning *argv`` in a new interpreter."""
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argv), json.dumps(HEAVY), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    return data["code"], data["imported"], result.stdout, result.stderr


def test_top_level_help_lists_every_command_without_heavy_imports(tmp_path):
    code, imported, stdout, _ = run_fresh(["--help"], tmp_path)
    assert code == 0
    assert imported == []
    commands = stdout.split("commands:", 1)[1]
    listed = re.findall(r"^ {4}(\w+) ", commands, flags=re.MULTILINE)
    assert listed == ["fit", "validate", "test", "predict", "sweep", "report", "probe", "dashboard"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nonsense"], "unknown command 'nonsense'; choose from fit, validate, test, predict, sweep, report"),
        (["--bogus", "fit"], "unrecognized option '--bogus'"),
        ([], "a command is required"),
        (["-c", "config.yaml", "report"], "report takes its options after its name"),
    ],
)
def test_usage_errors_exit_2_without_heavy_imports(argv, message, tmp_path):
    code, imported, _, stderr = run_fresh(argv, tmp_path)
    assert code == 2
    assert imported == []
    assert stderr.startswith("usage: moe-lightning ") and f"moe-lightning: error: {message}" in stderr


@pytest.mark.parametrize("command", ["report", "sweep", "dashboard"])
def test_project_commands_print_their_help_without_heavy_imports(command, tmp_path):
    code, imported, stdout, _ = run_fresh([command, "--help"], tmp_path)
    assert code == 0
    assert imported == []
    assert stdout.startswith(f"usage: moe-lightning {command} ")


def test_report_argument_error_comes_before_the_report_stack(tmp_path):
    code, imported, _, stderr = run_fresh(["report", "runs", "--layer-mode", "median"], tmp_path)
    assert code == 2
    assert imported == []
    assert "argument --layer-mode: invalid choice: 'median'" in stderr


def test_probe_help_needs_torch_only(tmp_path):
    """The probe's options carry ProbeConfig's defaults (torch dtypes); the model stack loads when it runs."""
    code, imported, stdout, _ = run_fresh(["probe", "--help"], tmp_path)
    assert code == 0
    assert imported == ["torch"]
    assert stdout.startswith("usage: moe-lightning probe ")


def write_csv_run(directory: Path, routing: str, sigma_max: float, replicates: list[float]) -> None:
    """A CSVLogger run's files as training writes them: ``hparams.yaml``, ``metrics.csv`` with one probe of
    ``blocks.0.ffn`` at step 10, and that probe's ``geometry/step_0000010.json`` with bootstrap replicates."""
    layer = "geometry/blocks.0.ffn"
    (directory / "geometry").mkdir(parents=True)
    (directory / "hparams.yaml").write_text(f"config:\n  input_dim: 8\n  routing: {routing}\nseed_everything: 0\n")
    (directory / "metrics.csv").write_text(
        f"step,val/loss,{layer}/tokens_total,{layer}/jac_sigma_max/mean\n9,0.75,,\n10,,64,{sigma_max}\n"
    )
    bootstrap = {"replicates": len(replicates), "seed": 0, "values": {"jac_sigma_max/mean": replicates}}
    payload = {"step": 10, "layers": {"blocks.0.ffn": {"bootstrap": bootstrap}}}
    (directory / "geometry" / "step_0000010.json").write_text(json.dumps(payload))


def test_report_tables_read_the_runs_without_torch_or_the_plotting_libraries(tmp_path):
    """The tables (md, csv) need pandas only: the saved geometry is read as JSON, not as tensors."""
    import numpy as np
    import pandas as pd

    topk, soft = [2.4, 2.5, 2.6, 2.7], [1.5, 1.5, 1.4, 1.5]
    write_csv_run(tmp_path / "runs" / "topk", "topk", 2.5, topk)
    write_csv_run(tmp_path / "runs" / "soft", "soft", 1.5, soft)
    out = tmp_path / "report"
    code, imported, stdout, _ = run_fresh(
        ["report", str(tmp_path / "runs"), "--out", str(out), "--format", "md", "csv"], tmp_path
    )
    assert code == 0
    assert imported == ["pandas"]
    assert sorted(Path(p).name for p in stdout.split()) == [
        "claims.csv",
        "claims.md",
        "claims_over_training.csv",
        "results.csv",
        "results.md",
    ]
    results = pd.read_csv(out / "results.csv").set_index("routing")
    assert results.at["topk", "jac_sigma_max/mean:mean"] == 2.5 and results.at["soft", "val/loss:mean"] == 0.75
    claims = pd.read_csv(out / "claims.csv")
    (sharper,) = claims[claims["statement"] == "top-k is sharper than soft"].itertuples()
    # The token bootstrap of the difference comes from the replicates in the saved JSON (numpy's percentiles).
    low, high = np.quantile(np.subtract(topk, soft), [0.025, 0.975])
    assert sharper.mean_difference == pytest.approx(1.0)
    assert (sharper.bootstrap_low, sharper.bootstrap_high) == pytest.approx((low, high))


def test_the_dispatcher_knows_lightning_clis_subcommands():
    from lightning.pytorch.cli import LightningCLI

    assert list(cli.TRAINER_COMMANDS) == list(LightningCLI.subcommands())


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["fit", "--config", "a.yaml"], "fit"),
        (["-c", "a.yaml", "fit"], "fit"),
        (["--config", "a.yaml", "--config=b.yaml", "validate"], "validate"),
        (["-ca.yaml", "test"], "test"),
        (["--print_config", "fit"], "fit"),
        (["--print_config=skip_default", "predict"], "predict"),
        (["-c", "a.yaml"], None),
    ],
)
def test_lightning_cli_options_before_the_command_are_skipped(argv, command):
    assert cli._scan(argv) == (command, False, None)


def test_help_and_unknown_options_are_found_before_the_command():
    assert cli._scan(["-c", "a.yaml", "--help", "fit"]) == (None, True, None)
    assert cli._scan(["--verbose", "fit"]) == (None, False, "--verbose")
    assert cli._scan(["fit", "--help"]) == ("fit", False, None)  # fit's own help, from jsonargparse


@pytest.mark.parametrize("package", ["moe_lightning.analysis", "moe_lightning.report", "moe_lightning.commands.probe"])
def test_packages_that_load_their_names_on_first_use_export_each_from_its_module(package):
    """The command packages import their modules lazily (for the start-up above); each name still resolves."""
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        source = importlib.import_module(f"{package}.{module._SOURCES[name]}")
        assert getattr(module, name) is getattr(source, name)
        assert name in dir(module)
    assert sorted(module._SOURCES) == sorted(module.__all__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
