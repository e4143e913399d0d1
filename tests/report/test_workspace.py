"""`moe-lightning dashboard`: the W&B workspace spec, built offline, points only at keys a real short run logged;
`--dry-run` and the no-credentials path never touch the network."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
import yaml
from wandb_workspaces.reports.v2 import CustomChart, LinePlot

from moe_lightning import commands as cli
from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.wandb_records import iter_wandb_records
from moe_lightning.report.workspace import STEP, geometry_report, geometry_sections, geometry_workspace

LAYERS = ("blocks.0.ffn", "blocks.1.ffn")
SECTIONS = [
    "Loss",
    "Jacobian spectra per layer",
    "PCA effective rank per site",
    "Alignment and subspace overlap vs chance",
    "Router health",
    "Curvature",
    "Spectra over training",
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def csv_keys(logged_run) -> set[str]:
    """Independent of the report's readers: the header of the CSV log."""
    return set(pd.read_csv(logged_run.csv / "metrics.csv", nrows=0).columns)


def wandb_history_keys(logged_run) -> set[str]:
    """Every history key of the W&B log, media included (their fields flattened as ``<key>/_type``)."""
    (log,) = logged_run.wandb.glob("run-*.wandb")
    keys = set()
    for record in iter_wandb_records(str(log)):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def test_every_panel_points_at_a_logged_key(logged_run):
    (csv_run,) = discover_runs([str(logged_run.csv)])
    (wandb_run,) = discover_runs([str(logged_run.wandb)])
    scalars, history = csv_keys(logged_run), wandb_history_keys(logged_run)
    assert csv_run.keys == scalars - {"step"}  # the CSV run's keys are its columns
    assert wandb_run.media_keys == {k[: -len("/_type")] for k in history if k.endswith("/_type")}
    keys = csv_run.keys | wandb_run.media_keys
    sections = geometry_sections(keys, entity="team")
    assert [s.name for s in sections] == SECTIONS
    lines = [p for s in sections for p in s.panels if isinstance(p, LinePlot)]
    charts = [p for s in sections for p in s.panels if isinstance(p, CustomChart)]
    assert len(lines) + len(charts) == sum(len(s.panels) for s in sections)
    for panel in lines:
        assert panel.x == STEP and STEP in history  # the step every callback logs at
        assert panel.y and set(panel.y) <= scalars, (panel.title, set(panel.y) - scalars)
        assert set(panel.y) <= history  # the W&B run logged them too
        assert panel.groupby.name == "config.routing"
    # Each layer has its σ_max, decay slope and effective rank; both chance levels are drawn.
    drawn = {y for panel in lines for y in panel.y}
    for layer in LAYERS:
        for quantity in ("jac_sigma_max/mean", "jac_decay_slope/mean", "jac_effective_rank/mean"):
            assert f"geometry/{layer}/{quantity}" in drawn
        assert {f"geometry/{layer}/align_chance", f"geometry/{layer}/subspace_overlap_chance"} <= drawn
        assert f"router/{layer}/load_cv" in drawn
    assert "curvature/hessian_top_eigenvalue" in drawn
    # Routings as line groups: the run's routing sits at config.routing in its hyperparameters.
    hparams = yaml.safe_load((logged_run.csv / "hparams.yaml").read_text())
    assert hparams["config"]["routing"] == "topk" and wandb_run.config["config"]["routing"] == "topk"
    # The spectra chart reads every logged version of the spectra table, by the table's own columns.
    (chart,) = charts
    assert chart.query == {"historyTable": {"tableKey": "geometry/spectra"}}
    assert chart.chart_name == "team/moe-lightning-spectra"
    tables = sorted((logged_run.wandb / "files" / "media" / "table").rglob("spectra_*.table.json"))
    assert len(tables) == 3  # one per probe: steps 0, 10, 20
    assert set(chart.chart_fields.values()) == set(json.loads(tables[0].read_text())["columns"])


def test_sections_follow_the_keys():
    keys = {"train/loss", "geometry/a/tokens_total", "geometry/a/jac_sigma_max/mean", "geometry/a/align_ratio"}
    sections = geometry_sections(keys)
    assert [s.name for s in sections] == [
        "Loss",
        "Jacobian spectra per layer",
        "Alignment and subspace overlap vs chance",
    ]
    assert [p.y for s in sections for p in s.panels] == [
        ["train/loss"],
        ["geometry/a/jac_sigma_max/mean"],
        ["geometry/a/align_ratio"],
    ]
    workspace = geometry_workspace("team", "proj", keys, filters="Config('config.routing') = 'topk'")
    assert [s.name for s in workspace.sections] == [s.name for s in sections]
    assert workspace.runset_settings.filters == "Config('config.routing') = 'topk'"
    report = geometry_report("team", "proj", keys)
    assert [b.text for b in report.blocks if type(b).__name__ == "H2"] == [s.name for s in sections]


def test_each_stability_threshold_is_drawn_beside_the_sharpness_it_bounds():
    keys = {
        "curvature/hessian_top_eigenvalue",
        "curvature/sgd_stability_threshold",
        "curvature/router/preconditioned_top_eigenvalue",
        "curvature/router/adam_stability_threshold",
        "curvature/experts/adam_stability_threshold",  # its sharpness was not logged: no panel
    }
    (curvature,) = geometry_sections(keys)
    assert [(p.title, p.y) for p in curvature.panels] == [
        ("Hessian top eigenvalue", ["curvature/hessian_top_eigenvalue"]),
        (
            "router: preconditioned_top_eigenvalue vs adam_stability_threshold",
            ["curvature/router/preconditioned_top_eigenvalue", "curvature/router/adam_stability_threshold"],
        ),
        (
            "model: hessian_top_eigenvalue vs sgd_stability_threshold",
            ["curvature/hessian_top_eigenvalue", "curvature/sgd_stability_threshold"],
        ),
    ]


def test_dry_run_prints_the_spec_without_network(logged_run, no_network, capsys):
    assert cli.main(["dashboard", str(logged_run.wandb), "--project", "proj", "--entity", "team", "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in spec["workspace"]["sections"]] == SECTIONS
    assert (spec["workspace"]["entity"], spec["workspace"]["project"]) == ("team", "proj")
    assert spec["spectra_chart"]["vega_lite"]["data"] == {"name": "wandb"}
    assert [b["text"] for b in spec["report"]["blocks"] if "collapsed_blocks" in b] == SECTIONS


@pytest.mark.parametrize("mode", ["offline", "no credentials"])
def test_without_credentials_it_writes_the_spec_and_fails(logged_run, no_network, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    if mode == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "spec.json"
    assert cli.main(["dashboard", str(logged_run.csv), "--project", "proj", "--out", str(out)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("moe-lightning dashboard: not saved to W&B (") and str(out) in line
    assert ("WANDB_MODE=offline" if mode == "offline" else "no W&B credentials") in line
    spec = json.loads(out.read_text())
    assert [s["name"] for s in spec["workspace"]["sections"]] == SECTIONS[:-1]  # no media in a CSV log


def test_bad_input(tmp_path, no_network, capsys):
    assert cli.main(["dashboard", "--project", "proj", "--dry-run"]) == 2
    assert "pass RUN_DIR" in capsys.readouterr().err
    assert cli.main(["dashboard", str(tmp_path), "--project", "proj", "--dry-run"]) == 2
    assert "no runs found" in capsys.readouterr().err
