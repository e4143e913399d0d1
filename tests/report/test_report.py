"""`moe-lightning report` on real tiny runs: results and claims checked against numbers recomputed from each run's
metrics.csv; figures and the HTML page; the W&B offline path; bad input. The decision rule itself is tested in
test_intervals.py and test_claims_report.py."""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch

from moe_lightning import commands as cli
from moe_lightning.analysis import DECISION_RULE, decide, decide_threshold
from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.steps import GEOMETRY_METRICS
from moe_lightning.analysis.wandb_runs import _seed_from_args
from moe_lightning.geometry import GeometryReport
from moe_lightning.report import build_report, render_probe

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter is intended")

ROOT = Path(__file__).resolve().parents[2]
ROUTINGS = ("dense", "topk", "soft")
SEEDS = (0, 1)
FIGURES = ("spectra.png", "curves.png", "alignment.png", "pca_spectra.png", "router_load.png")
FIGURES_WITH_CLAIMS = (*FIGURES, "claims_over_training.png")
JOB_ROUTING = {"dense_total": "dense", "topk": "topk", "soft": "soft"}  # arm -> the sweep job's routing
# Two MoE blocks (so the layer mean is a real average), 4 experts, 20 steps, probes at steps 0, 10 and 20,
# validation every epoch (8 steps) so that val/loss exists.
TINY = """
trainer:
  max_steps: 20
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  callbacks:
    - class_path: moe_lightning.callbacks.GeometryMonitor
      init_args: {every_n_steps: 10, max_tokens: 64, log_media: false}
    - class_path: moe_lightning.callbacks.RouterMonitor
model:
  init_args:
    config: {input_dim: 8, output_dim: 8, dim: 16, expert_hidden: 8, num_experts: 4, num_blocks: 2}
data:
  init_args: {input_dim: 8, output_dim: 8, num_clusters: 4, num_train: 512, num_val: 128, num_test: 128, batch_size: 64}
"""


# ---------------------------------------------------------------------------------------------------------------
# Real tiny runs
# ---------------------------------------------------------------------------------------------------------------


def fit(tiny: Path, routing: str, seed: int, *logger_args: str) -> None:
    cli.main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "mlp" / f"{routing}.yaml"),
            "--config",
            str(ROOT / "configs" / "trainer" / "cpu.yaml"),
            "--config",
            str(tiny),
            f"--seed_everything={seed}",
            "--summary=false",  # these tests read the sweep report; tests/test_run_summary.py covers a run's own
            *logger_args,
        ]
    )


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory, tiny_config) -> Path:
    """A sweep directory laid out like moe_lightning.commands.sweep's: <routing>-seed<k>/ with run.json and CSV
    logs, plus a failed job (no metrics) and a job still running (a copy of real metrics that must not be counted)."""
    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids oversubscribing a shared CPU
    try:
        for routing in ROUTINGS:
            for seed in SEEDS:
                job = root / f"{routing}-seed{seed}"
                csv = ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={job}"]
                fit(tiny_config, routing, seed, *csv, "--trainer.logger.name=", "--trainer.logger.version=")
                meta = {"preset": "test", "family": "mlp", "routing": routing, "seed": seed, "status": "done"}
                (job / "run.json").write_text(json.dumps({**meta, "returncode": 0, "wall_s": 1.0, "command": []}))
    finally:
        torch.set_num_threads(threads)
    failed = root / "topk-seed2"
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"routing": "topk", "seed": 2, "status": "failed", "returncode": 1}))
    running = root / "soft-seed3"
    shutil.copytree(root / "soft-seed0", running)
    (running / "run.json").write_text(json.dumps({"routing": "soft", "seed": 3, "status": "running"}))
    (root / "sweep.json").write_text(json.dumps({"preset": "test"}))
    return root


@pytest.fixture(scope="module")
def report(trained_sweep) -> Path:
    """The report written through the real `moe-lightning report` entry point."""
    assert cli.main(["report", str(trained_sweep)]) == 0
    return trained_sweep / "report"


def direct_final(job: Path, key: str) -> float:
    """Independent reference: the metric at each layer's last probe row of the raw metrics.csv, averaged over
    layers (NaN when no layer has it)."""
    raw = pd.read_csv(job / "metrics.csv")
    layers = [c.split("/")[1] for c in raw.columns if c.startswith("geometry/") and c.endswith("/tokens_total")]
    assert len(layers) == 2
    values = []
    for layer in layers:
        last_probe = raw[raw[f"geometry/{layer}/tokens_total"].notna()].iloc[-1]
        value = last_probe.get(f"geometry/{layer}/{key}", math.nan)
        if np.isfinite(value):
            values.append(value)
    return float(np.mean(values)) if values else math.nan


def test_results_match_metrics_csv(trained_sweep, report):
    results = pd.read_csv(report / "results.csv")
    assert list(results["routing"]) == list(ROUTINGS)
    assert (results["n_seeds"] == 2).all() and (results["layer"] == "mean").all()
    for routing in ROUTINGS:
        row = results[results["routing"] == routing].iloc[0]
        for key, _ in GEOMETRY_METRICS:
            per_seed = [direct_final(trained_sweep / f"{routing}-seed{seed}", key) for seed in SEEDS]
            if routing == "dense" and key.startswith(("align", "palign", "subspace")):
                assert all(math.isnan(v) for v in per_seed) and math.isnan(row[f"{key}:mean"])
                continue
            np.testing.assert_allclose(row[f"{key}:mean"], np.mean(per_seed), rtol=1e-12, err_msg=f"{routing} {key}")
            np.testing.assert_allclose(row[f"{key}:std"], np.std(per_seed, ddof=1), rtol=1e-9, err_msg=key)
            assert row[f"{key}:n"] == 2
        val = [
            pd.read_csv(trained_sweep / f"{routing}-seed{s}" / "metrics.csv")["val/loss"].dropna().iloc[-1]
            for s in SEEDS
        ]
        np.testing.assert_allclose(row["val/loss:mean"], np.mean(val), rtol=1e-12)
    text = (report / "results.md").read_text()
    assert "averaged over the run's MoE layers" in text and "topk seed 2: failed" in text


def test_claims_follow_the_rule_on_direct_numbers(trained_sweep, report):
    claims = pd.read_csv(report / "claims.csv")
    assert len(claims) == 17
    assert set(claims["claim"]) == {"C1a", "C1a (control)", "C1b", "C2", "C3", "C4"}
    assert (claims["metric"] == "pca_hidden_effective_rank/mean").sum() == 3  # C2 topk, soft; C4
    for row in claims.to_dict("records"):
        comparison = row["comparison"].split()  # "topk < dense_total", or "topk align_mean_offdiag < 0.1" for C3
        a = {s: direct_final(trained_sweep / f"{comparison[0]}-seed{s}", row["metric"]) for s in SEEDS}
        if row["claim"] == "C3":
            expected = decide_threshold(a, 0.1)
        else:
            b = {s: direct_final(trained_sweep / f"{JOB_ROUTING[comparison[2]]}-seed{s}", row["metric"]) for s in SEEDS}
            expected = decide(a, b, comparison[1])
        assert row["verdict"] == expected.verdict, row
        np.testing.assert_allclose(row["mean_difference"], expected.mean_difference, rtol=1e-9)
        assert row["n seeds"] == 2
    assert DECISION_RULE in (report / "claims.md").read_text()


def test_figures_and_html(trained_sweep, report):
    for name in FIGURES_WITH_CLAIMS:
        path = report / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height > 200 and width > 300, name
    page = (report / "index.html").read_text()
    # The page draws the same figures as interactive charts, with Plotly inlined (nothing to fetch), not the PNGs.
    kinds = ("spectra", "curves", "alignment", "pca", "router", "claims")
    assert [page.count(f'<div class="chart" data-kind="{kind}"') for kind in kinds] == [1] * len(kinds)
    body = page.split("</head>", 1)[1]  # Plotly's inlined script, in the head, holds such strings itself
    assert "<img" not in body and 'src="http' not in page
    assert page.count('<table class="config">') == 1
    assert page.count("<table") >= 4  # settings, results (split to fit the page), claims, runs
    assert html.escape(DECISION_RULE) in page
    assert str(trained_sweep / "topk-seed2") in page and ">failed<" in page and ">running<" in page


SWEEP_PAGE_JS = """() => ({
  config: Object.fromEntries([...document.querySelectorAll('table.config td.key')]
      .map(td => [td.textContent, td.nextElementSibling.textContent])),
  headings: [...document.querySelectorAll('h3')].map(h => h.textContent),
})"""


def test_curves_end_with_the_validation_loss(trained_sweep, tmp_path):
    """The curves figure's last panel is each run's validation loss over training, as its metrics.csv logged it."""
    from moe_lightning.report.figures import FigureData, curves_panels

    runs = discover_runs([str(trained_sweep)])
    title, _, series = curves_panels(FigureData.of(runs, str(tmp_path)))[-1]
    assert title == "Validation loss"
    assert {label: len(members) for label, members in series.items()} == {"dense_total": 2, "topk": 2, "soft": 2}
    for label, members in series.items():
        expected = []
        for seed in SEEDS:
            raw = pd.read_csv(trained_sweep / f"{JOB_ROUTING[label]}-seed{seed}" / "metrics.csv")
            expected.append(sorted(zip(raw["step"][raw["val/loss"].notna()], raw["val/loss"].dropna(), strict=True)))
        got = sorted(sorted(zip(s.index, s.to_numpy(), strict=True)) for s in members)
        assert got == sorted(expected), label


def test_sweep_page_in_chromium_at_1400_px(report, tmp_path):
    """The page of several runs as a reader sees it: the runs' settings, every figure an interactive chart under a
    heading that says what it shows, labelled axes, legends, and nothing wider than a 1400 px window."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    from helpers import load_script

    screenshot = load_script(ROOT / "scripts" / "dashboard_screenshot.py")
    try:
        rendered = screenshot.render(report / "index.html", tmp_path / "page.png", max_height=10, extract=SWEEP_PAGE_JS)
    except RuntimeError as error:
        pytest.skip(f"no browser could be started ({error}); .ci/run installs the Debian package chromium")
    assert rendered.errors == [] and rendered.outside == []
    config = rendered.traces["config"]
    # The finished runs (the running soft-seed3 is left out) of the TINY config: 4 experts, top-2, 20 steps.
    assert config["routing"] == "dense / topk / soft" and config["seed"] == "0 / 1"
    assert config["experts"] == "1 (dense FFN) / 4" and config["last logged step"] == "20"
    assert config["wall time per run"] == "1 s"  # run.json's wall_s of every job
    headings = rendered.traces["headings"]
    assert len(headings) == 6 and not any(h.endswith(".png") for h in headings)
    assert {kind for kind, _, n in rendered.charts if n > 0} == {
        "spectra",
        "curves",
        "alignment",
        "pca",
        "router",
        "claims",
    }
    layout = rendered.layout
    assert layout["untitled"] == []
    legends = {kind: names for kind, _, names in layout["legends"]}
    assert {"dense_total (2 seeds)", "topk (2 seeds)", "soft (2 seeds)"} <= set(legends["curves"])
    assert {"e0", "e3", "uniform 1/E"} <= set(legends["router"])
    assert layout["width"] <= layout["window"] == 1400 and layout["wide"] == []


def test_layer_mode_each(trained_sweep, tmp_path):
    written = build_report([str(trained_sweep)], str(tmp_path), layer_mode="each", formats=("csv",))
    assert sorted(Path(p).name for p in written) == ["claims.csv", "claims_over_training.csv", "results.csv"]
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 6 and set(results["layer"]) == {"blocks.0.ffn", "blocks.1.ffn"}
    row = results[(results["routing"] == "topk") & (results["layer"] == "blocks.1.ffn")].iloc[0]
    per_seed = []
    for seed in SEEDS:
        raw = pd.read_csv(trained_sweep / f"topk-seed{seed}" / "metrics.csv")
        per_seed.append(raw["geometry/blocks.1.ffn/jac_sigma_max/mean"].dropna().iloc[-1])
    np.testing.assert_allclose(row["jac_sigma_max/mean:mean"], np.mean(per_seed), rtol=1e-12)
    assert len(pd.read_csv(tmp_path / "claims.csv")) == 2 * 17  # the claims per layer


def test_render_probe(trained_sweep, tmp_path):
    layers = {}
    for routing in ("topk", "dense"):
        payload = json.loads((trained_sweep / f"{routing}-seed0" / "geometry" / "step_0000020.json").read_text())
        layers[routing] = GeometryReport.from_dict(payload["layers"]["blocks.0.ffn"])
    written = render_probe(layers, str(tmp_path / "probe"), "two layers")
    names = [Path(p).name for p in written]
    assert names == ["probe.md", "probe.csv", "spectra.png", "alignment.png", "pca_spectra.png", "index.html"]
    table = pd.read_csv(tmp_path / "probe" / "probe.csv").set_index("layer")
    for name, layer in layers.items():
        scalars = layer.scalars(prefix="g")
        for key in ("jac_sigma_max/mean", "pca_hidden_effective_rank/mean", "layer_jac_sigma_max"):
            np.testing.assert_allclose(table.loc[name, key], scalars[f"g/{key}"], rtol=1e-12)
    assert np.isnan(table.loc["dense", "align_mean_offdiag"])
    assert table.loc["topk", "align_mean_offdiag"] == pytest.approx(layers["topk"].layer["align_mean_offdiag"])
    page = (tmp_path / "probe" / "index.html").read_text()
    for kind in ("spectra", "alignment", "pca"):  # the figures' data as interactive charts
        assert page.count(f'<div class="chart" data-kind="{kind}"') == 1, kind
    assert "not drawn" not in page
    with pytest.raises(ValueError, match="layers is empty"):
        render_probe({}, str(tmp_path), "none")


@pytest.mark.integration  # `moe-lightning fit` with W&B offline
def test_wandb_offline_run(tmp_path, monkeypatch, tiny_config):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the default logger: AutoWandbLogger
        fit(
            tiny_config,
            "soft",
            5,
            "--data.init_args.seed=7",  # differs from seed_everything, so the test tells the two sources apart
            f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}",
        )
    finally:
        torch.set_num_threads(threads)
        wandb.finish()
        wandb.teardown()  # finish() can return before the service has flushed the end of the .wandb file
    runs = discover_runs([str(tmp_path / "wb")])
    assert len(runs) == 1
    run = runs[0]
    assert (run.source, run.routing, run.seed, run.family, run.status) == ("wandb", "soft", 5, "mlp", "done")
    assert run.note == ""  # the seed is the seed_everything that moe-lightning's CLI logs with the hyperparameters
    assert run.geometry_dir == str(Path(run.path) / "geometry")  # the run folder's, next to its W&B runs
    reports = sorted(Path(run.geometry_dir).glob("step_*.json"))
    final = json.loads(reports[-1].read_text())
    assert final["step"] == 20
    for layer in ("blocks.0.ffn", "blocks.1.ffn"):  # independent source: the geometry JSON
        scalars = GeometryReport.from_dict(final["layers"][layer]).scalars(prefix=f"geometry/{layer}")
        for key in (f"geometry/{layer}/jac_sigma_max/mean", f"geometry/{layer}/align_mean_offdiag"):
            assert run.history[key].dropna().index[-1] == 20
            np.testing.assert_allclose(run.history[key].dropna().iloc[-1], scalars[key], rtol=1e-12)
    written = build_report([str(tmp_path / "wb")], str(tmp_path / "out"), formats=("csv",))
    results = pd.read_csv([p for p in written if p.endswith("results.csv")][0])
    expected = np.mean(
        [
            GeometryReport.from_dict(final["layers"][la]).scalars(prefix="g")["g/jac_sigma_max/mean"]
            for la in ("blocks.0.ffn", "blocks.1.ffn")
        ]
    )
    np.testing.assert_allclose(results.loc[0, "jac_sigma_max/mean:mean"], expected, rtol=1e-12)
    assert results.loc[0, "n_seeds"] == 1 and np.isnan(results.loc[0, "jac_sigma_max/mean:std"])


def test_seed_from_recorded_command_line():
    assert _seed_from_args(["fit", "--config", "a.yaml", "--seed_everything=3"]) == 3
    assert _seed_from_args(["fit", "--seed_everything", "4", "--trainer.max_steps=2"]) == 4
    assert _seed_from_args(["fit", "--seed_everything=true"]) is None and _seed_from_args([]) is None


# ---------------------------------------------------------------------------------------------------------------
# Bad and partial input
# ---------------------------------------------------------------------------------------------------------------


def test_directory_without_runs_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("moe-lightning: error: no runs found in") and str(tmp_path / "empty") in error
    assert "run.json" in error and "metrics.csv" in error and ".wandb" in error
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_same_run_twice_is_an_error(trained_sweep):
    with pytest.raises(ValueError, match="two runs with arm='dense_total' and seed=0"):
        discover_runs([str(trained_sweep / "dense-seed0"), str(trained_sweep)])


def test_run_without_geometry_skips_figures(tmp_path):
    """A CSV run without probes: routing and seed from hparams.yaml, losses tabulated, figures skipped with notes,
    no claims."""
    run = tmp_path / "plain"
    run.mkdir()
    pd.DataFrame({"step": [4, 9, 9], "train/loss": [1.0, 0.5, None], "val/loss": [None, None, 0.7]}).to_csv(
        run / "metrics.csv", index=False
    )
    (run / "hparams.yaml").write_text("config:\n  routing: topk\n  input_dim: 8\nseed: 3\n")
    build_report([str(run)])
    results = pd.read_csv(run / "report" / "results.csv")
    assert (results.loc[0, "routing"], str(results.loc[0, "seeds"]), results.loc[0, "family"]) == ("topk", "3", "mlp")
    assert results.loc[0, "val/loss:mean"] == 0.7 and results.loc[0, "train/loss:mean"] == 0.5
    page = (run / "report" / "index.html").read_text()  # a single run: its dashboard, which notes what is missing
    assert "<img " not in page and 'data-kind="loss"' in page
    assert "no geometry/&lt;layer&gt;/… key was logged" in page and "no saved geometry/step_*.json report" in page
    assert not (run / "report" / "claims.csv").exists()  # one routing: nothing to compare


@pytest.mark.slow
def test_report_of_a_real_sweep(tmp_path, monkeypatch, tiny_config):
    """End to end through `moe-lightning sweep` (subprocess jobs with CSV and W&B loggers), which calls the report."""
    from moe_lightning.commands import sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    preset = tmp_path / "tiny.yaml"
    configs = [str(ROOT / "configs/mlp/topk.yaml"), str(ROOT / "configs/trainer/cpu.yaml"), str(tiny_config)]
    arms = ["dense_total", "topk", "soft"]  # the dense control under its sweep arm name
    preset.write_text(
        json.dumps({"name": "tiny", "family": "mlp", "configs": configs, "seeds": list(SEEDS), "routings": arms})
    )
    assert sweep.main([str(preset), "--out", str(tmp_path / "out")]) == 0
    root = tmp_path / "out" / "tiny"
    results = pd.read_csv(root / "report" / "results.csv")
    assert list(results["routing"]) == arms and (results["n_seeds"] == 2).all()
    for routing in arms:
        per_seed = [direct_final(root / f"{routing}-seed{s}", "jac_sigma_max/mean") for s in SEEDS]
        row = results[results["routing"] == routing].iloc[0]
        np.testing.assert_allclose(row["jac_sigma_max/mean:mean"], np.mean(per_seed), rtol=1e-12)
    page = (root / "report" / "index.html").read_text()
    assert [name for name in FIGURES_WITH_CLAIMS if not (root / "report" / name).is_file()] == []
    assert page.count('<div class="chart" data-kind=') == len(FIGURES_WITH_CLAIMS) and "not drawn" not in page


# ---------------------------------------------------------------------------------------------------------------
# Hessian spectral density over training
# ---------------------------------------------------------------------------------------------------------------


def test_curvature_densities_read_every_saved_step_in_order(tmp_path):
    from moe_lightning.analysis.run import Run
    from moe_lightning.report.figures import curvature_densities

    folder = tmp_path / "curvature"
    folder.mkdir()
    for step, scale in ((20, 2.0), (0, 1.0), (10, 1.5)):  # written out of order
        densities = {
            "curvature": {"grid": [0.0, 1.0, 2.0], "density": [scale, 0.5, 0.25]},
            "curvature/router": {"grid": [0.0, 1.0], "density": [9.0, 9.0]},
        }
        (folder / f"step_{step:07d}.json").write_text(json.dumps({"step": step, "densities": densities}))
    series = curvature_densities(Run(path=str(tmp_path), source="csv"))
    assert [step for step, _, _ in series] == [0, 10, 20]
    assert [d[0] for _, _, d in series] == [1.0, 1.5, 2.0]  # the whole model's density, not the router's
    np.testing.assert_array_equal(series[0][1], [0.0, 1.0, 2.0])
    router = curvature_densities(Run(path=str(tmp_path), source="csv"), prefix="curvature/router")
    assert [d.tolist() for _, _, d in router] == [[9.0, 9.0]] * 3


@pytest.mark.integration  # `moe-lightning fit`
def test_report_draws_the_density_of_a_run_with_curvature_monitor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "curvature.yaml"
    config.write_text(
        TINY.replace(
            "    - class_path: moe_lightning.callbacks.RouterMonitor\n",
            "    - class_path: moe_lightning.callbacks.RouterMonitor\n"
            "    - class_path: moe_lightning.callbacks.CurvatureMonitor\n"
            # The density is what the report draws; a short Lanczos and no trace keep the three probes cheap.
            "      init_args: {every_n_steps: 10, trace: false, eigen_max_iter: 8, density_starts: 1,"
            " density_steps: 12}\n",
        )
    )
    args = ["fit", "--config", str(ROOT / "configs/mlp/topk.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    args += ["--config", str(config), "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    assert cli.main([*args, "--summary=false"]) == 0
    (run_dir,) = {p.parent.parent for p in tmp_path.rglob("curvature/step_*.json")}
    saved = sorted(json.loads(p.read_text())["step"] for p in (run_dir / "curvature").glob("step_*.json"))
    assert saved == [0, 10, 20]
    written = build_report([str(run_dir)], out_dir=str(tmp_path / "report"))
    assert str(tmp_path / "report" / "curvature_density.png") in written
    image = matplotlib.image.imread(tmp_path / "report" / "curvature_density.png")
    assert image.shape[0] > 100 and image.std() > 0  # a drawn figure, not an empty canvas
    assert '<div class="chart" data-kind="curvature_density"' in (tmp_path / "report" / "index.html").read_text()
