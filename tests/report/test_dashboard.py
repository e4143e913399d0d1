"""The dashboard of one run: what it gathers against the run's raw CSV log and JSON reports (and a TensorBoard log
directory read as a run), and the page opened in
a real headless browser (Chromium through Playwright), which must render a chart of each kind for each MoE layer
with the logged numbers, without a script error or a request outside the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from helpers import load_script

from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.timeline import (
    curvature_curves,
    layer_quantities,
    probe_matrices,
    router_load,
    saved_reports,
    spectrum_evolution,
)
from moe_lightning.report import build_report
from moe_lightning.report.dashboard import dashboard_sections

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("blocks.0.ffn", "blocks.1.ffn")
PER_LAYER_KINDS = ("geometry", "spectrum", "pca", "router", "matrices")
# The values of one subplot of a layer's small multiples, of its router-load heatmap and of its spectrum heatmaps,
# read back from the charts Plotly drew (_fullData: the traces as drawn, their arrays decoded).
SUBPLOT_JS = """([layer, title, name]) => {
  const plot = document.querySelector(`div.chart[data-kind="geometry"][data-layer="${layer}"] .js-plotly-plot`);
  const index = plot.layout.annotations.findIndex(a => a.text === title);
  const axis = index === 0 ? 'x' : 'x' + (index + 1);
  const trace = plot._fullData.find(t => t.xaxis === axis && t.name === name);
  const router = document.querySelector(`div.chart[data-kind="router"][data-layer="${layer}"] .js-plotly-plot`);
  const spectrum = document.querySelector(`div.chart[data-kind="spectrum"][data-layer="${layer}"] .js-plotly-plot`);
  const rows = z => Array.from(z, r => Array.from(r, v => (v === null ? NaN : v)));
  return {x: Array.from(trace.x), y: Array.from(trace.y), load: rows(router._fullData[0].z),
          spectrum: spectrum._fullData.map(t => rows(t.z))};
}"""


def raw_csv(logged_run) -> pd.DataFrame:
    """Independent of the report's reader: the CSV log, one row per step (each column's non-null value)."""
    raw = pd.read_csv(logged_run.csv / "metrics.csv")
    return raw.groupby("step").max()


def logged(raw: pd.DataFrame, key: str) -> pd.Series:
    return raw[key].dropna()


def test_quantities_router_load_and_curvature_match_the_csv_log(logged_run):
    (run,) = discover_runs([str(logged_run.csv)])
    raw = raw_csv(logged_run)
    quantities = {q.name: q for q in layer_quantities(run.history, "blocks.1.ffn")}
    prefix = "geometry/blocks.1.ffn/"
    sigma = quantities["jac_sigma_max"]
    pd.testing.assert_series_equal(sigma.value, logged(raw, prefix + "jac_sigma_max/mean"), check_names=False)
    assert list(sigma.experts) == ["e0", "e1", "e2", "e3"]
    np.testing.assert_array_equal(sigma.experts["e2"], logged(raw, prefix + "jac_sigma_max/e2"))
    np.testing.assert_array_equal(sigma.spread, logged(raw, prefix + "jac_sigma_max_std/mean"))
    assert list(sigma.value.index) == [0, 10, 20]  # the probes
    # Chance levels: logged next to the quantity, or 1 for a ratio; never panels of their own.
    np.testing.assert_array_equal(quantities["align_mean_offdiag"].chance, logged(raw, prefix + "align_chance"))
    np.testing.assert_array_equal(
        quantities["subspace_rep_overlap"].chance, logged(raw, prefix + "subspace_overlap_chance")
    )
    assert (quantities["align_ratio"].chance == 1.0).all() and quantities["jac_sigma_max"].chance is None
    assert not {"align_chance", "subspace_overlap_chance", "jac_sigma_max_std"} & set(quantities)
    # Every logged quantity of the layer is a panel (the chance levels and _std spreads aside).
    stems = {c[len(prefix) :].split("/")[0] for c in raw.columns if c.startswith(prefix)}
    stems -= {"align_chance", "subspace_overlap_chance"} | {s for s in stems if s.endswith("_std")}
    assert set(quantities) == stems
    load = router_load(run.history)["blocks.0.ffn"]
    assert list(load.columns) == ["e0", "e1", "e2", "e3"]
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-6)  # shares of the routed assignments
    np.testing.assert_array_equal(load["e3"], logged(raw, "router/blocks.0.ffn/load/e3"))
    curves = curvature_curves(run.history)
    assert set(curves["curvature/hessian_eigenvalue"]) == {"#1", "#2"}  # top_k=2 in one panel
    np.testing.assert_array_equal(
        curves["curvature/hessian_trace"]["hessian_trace"], logged(raw, "curvature/hessian_trace")
    )
    # AdamW: its stability threshold is drawn in the panel of the preconditioned sharpness it bounds.
    sharpness = curves["curvature/preconditioned_top_eigenvalue"]
    assert set(sharpness) == {"preconditioned_top_eigenvalue", "adam_stability_threshold"}
    np.testing.assert_array_equal(
        sharpness["adam_stability_threshold"], logged(raw, "curvature/adam_stability_threshold")
    )
    assert "curvature/adam_stability_threshold" not in curves
    page = dict(dashboard_sections(run))["Curvature"]
    assert page.count("Sharpness against the edge of stability") == 1  # its own grid, on a log axis


def test_spectra_and_matrices_match_the_saved_reports(logged_run):
    (run,) = discover_runs([str(logged_run.csv)])
    reports = saved_reports(run)
    files = sorted((logged_run.csv / "geometry").glob("step_*.json"))
    raw = [json.loads(p.read_text()) for p in files]
    assert [step for step, _ in reports] == [r["step"] for r in raw] == [0, 10, 20]
    (expert_mean, layer_spectrum) = spectrum_evolution(reports)["blocks.0.ffn"]
    for column, payload in enumerate(raw):
        layer = payload["layers"]["blocks.0.ffn"]
        spectra, weights = np.array(layer["spectra"]["jac_mean_spectrum"]), np.array(layer["weight_sum"])
        keep = np.isfinite(spectra).all(axis=1) & (weights > 0)  # experts without tokens have no spectrum
        expected = (spectra[keep] * weights[keep, None]).sum(axis=0) / weights[keep].sum()
        np.testing.assert_allclose(expert_mean.values_MS[:, column], expected, rtol=1e-12)
        np.testing.assert_array_equal(layer_spectrum.values_MS[:, column], layer["spectra"]["layer_jac_mean_spectrum"])
    matrices = probe_matrices(reports)["blocks.1.ffn"]
    assert [(key, step) for key, step, _ in matrices[:2]] == [("align_mean_jacobian", 0), ("align_mean_jacobian", 20)]
    last = raw[-1]["layers"]["blocks.1.ffn"]["matrices"]["subspace_rep_overlap"]
    np.testing.assert_array_equal(
        next(m for key, step, m in matrices if (key, step) == ("subspace_rep_overlap", 20)), np.array(last, dtype=float)
    )


@pytest.fixture(scope="module")
def dashboard(logged_run, tmp_path_factory) -> Path:
    """The page ``moe-lightning report`` writes for the single run."""
    out = tmp_path_factory.mktemp("dashboard")
    written = build_report([str(logged_run.csv)], str(out), formats=("md", "html"))
    assert sorted(Path(p).name for p in written if not p.endswith(".png")) == ["index.html", "results.md"]
    return out / "index.html"


def test_single_run_page_has_no_claims(dashboard):
    text = dashboard.read_text()
    assert "Claims" not in text and "inconclusive" not in text
    assert not (dashboard.parent / "claims.md").exists()
    assert "<script>" in text and 'src="http' not in text  # Plotly inlined: nothing to fetch


def test_dashboard_renders_in_a_headless_browser(dashboard, logged_run, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    screenshot = load_script(ROOT / "scripts" / "dashboard_screenshot.py")
    png = tmp_path / "dashboard.png"
    try:
        rendered = screenshot.render(
            dashboard, png, max_height=4000, extract=SUBPLOT_JS, extract_arg=["blocks.0.ffn", "jac_sigma_max", "mean"]
        )
    except RuntimeError as error:
        pytest.skip(f"no browser could be started ({error}); .ci/run installs the Debian package chromium")
    assert rendered.errors == [] and rendered.outside == []
    for layer in LAYERS:
        for kind in PER_LAYER_KINDS:
            counts = [n for k, la, n in rendered.charts if (k, la) == (kind, layer)]
            assert counts and counts[0] > 0, f"no rendered {kind} chart for {layer}"
    assert {kind for kind, _, n in rendered.charts if n > 0} == {*PER_LAYER_KINDS, "loss", "curvature"}
    # The chart holds the logged numbers.
    raw = raw_csv(logged_run)
    sigma = logged(raw, "geometry/blocks.0.ffn/jac_sigma_max/mean")
    assert rendered.traces["x"] == list(sigma.index)
    np.testing.assert_allclose(rendered.traces["y"], sigma.to_numpy(), rtol=1e-12)
    load = np.array(rendered.traces["load"], dtype=float)  # experts x steps
    expected = np.stack([logged(raw, f"router/blocks.0.ffn/load/e{e}").to_numpy() for e in range(4)])
    np.testing.assert_allclose(load, expected, rtol=1e-12)
    # The spectrum heatmaps: log10 σ_i of the Σw-weighted expert mean (from the raw reports), and its change since
    # the first probe.
    expected = []
    for path in sorted((logged_run.csv / "geometry").glob("step_*.json")):
        layer = json.loads(path.read_text())["layers"]["blocks.0.ffn"]
        spectra, weights = np.array(layer["spectra"]["jac_mean_spectrum"]), np.array(layer["weight_sum"])
        keep = np.isfinite(spectra).all(axis=1) & (weights > 0)
        expected.append((spectra[keep] * weights[keep, None]).sum(axis=0) / weights[keep].sum())
    expected = np.stack(expected, axis=1)  # (M, S)
    mean, _layer, change = (np.array(z, dtype=float) for z in rendered.traces["spectrum"])
    np.testing.assert_allclose(mean, np.log10(expected), rtol=1e-12)
    np.testing.assert_allclose(change, np.log10(expected / expected[:, :1]), rtol=1e-9, atol=1e-12)
    # The screenshot shows a drawn page, not a blank one.
    image = matplotlib.image.imread(png)
    assert image.shape[1] == 1400 and image.shape[0] > 3000
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert ink > 0.05 and not math.isclose(float(image.std()), 0.0)


# What the page shows as text: the settings block, the constants line, the section headings.
PAGE_TEXT_JS = """() => ({
  config: Object.fromEntries([...document.querySelectorAll('table.config td.key')]
      .map(td => [td.textContent, td.nextElementSibling.textContent])),
  constants: [...document.querySelectorAll('p.constants')].map(p => [p.dataset.layer, p.textContent]),
  marks: [...document.querySelectorAll('dl.marks dt')].map(dt => dt.textContent),
  titles: Object.fromEntries([...document.querySelectorAll('div.chart[data-kind="geometry"] .js-plotly-plot')]
      .map(p => [p.parentElement.parentElement.dataset.layer, p.layout.annotations.map(a => a.text)])),
})"""


def test_run_page_in_chromium_at_1400_px(dashboard, logged_run, tmp_path):
    """The run page as a reader sees it: the run's settings, labelled axes, a legend of the experts, no panel of a
    series that never changed, every mark explained, and nothing wider than a 1400 px window."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    screenshot = load_script(ROOT / "scripts" / "dashboard_screenshot.py")
    try:
        rendered = screenshot.render(dashboard, tmp_path / "page.png", width=1400, max_height=10, extract=PAGE_TEXT_JS)
    except RuntimeError as error:
        pytest.skip(f"no browser could be started ({error}); .ci/run installs the Debian package chromium")
    page, layout = rendered.traces, rendered.layout
    assert rendered.errors == []
    # The settings, as the run's hparams.yaml and the trainer config of conftest.LOGGED say.
    config = page["config"]
    assert (config["routing"], config["experts"], config["experts per token (k)"]) == ("topk", "4", "2")
    assert (config["learning rate"], config["seed"], config["last logged step"]) == ("0.002", "0", "20")
    assert config["max_steps / max_epochs"].startswith("20 /")
    assert config["wall time"].startswith("not recorded")  # a CSV log keeps no clock
    # Every axis that holds a trace has a title; the geometry charts have a legend naming the experts.
    assert layout["untitled"] == []
    legends = {(kind, layer): names for kind, layer, names in layout["legends"]}
    for layer in LAYERS:
        assert {"e0", "e1", "e2", "e3", "mean", "chance", "± token-level std"} <= set(legends["geometry", layer])
    # tokens_total is the probe set's size, 64 at every probe: listed once, not drawn.
    raw = raw_csv(logged_run)
    for layer in LAYERS:
        assert set(logged(raw, f"geometry/{layer}/tokens_total")) == {64.0}
        assert "tokens_total" not in page["titles"][layer] and "jac_sigma_max" in page["titles"][layer]
    constants = {layer: line for layer, line in page["constants"]}
    assert all("tokens_total = 64" in constants[layer] for layer in LAYERS)
    for layer in LAYERS:  # a geometry panel is drawn when its value or one of its experts changes, else listed
        prefix = f"geometry/{layer}/"
        stems = {c[len(prefix) :].split("/")[0] for c in raw.columns if c.startswith(prefix)}
        for stem in stems - {"align_chance", "subspace_overlap_chance"} - {s for s in stems if s.endswith("_std")}:
            columns = [c for c in raw.columns if c == prefix + stem or c.startswith(prefix + stem + "/")]
            changes = any(logged(raw, c).nunique() > 1 for c in columns)
            listed = f" {stem} = " in constants[layer].replace(":", ",").replace(",", " ,")
            assert (stem in page["titles"][layer], listed) == (changes, not changes), stem
    assert {"†u/n", "n/a", "grey band", "dashed red line"} <= set(page["marks"])
    # Nothing scrolls sideways at 1400 px: not the page, not a table.
    assert layout["width"] <= layout["window"] == 1400 and layout["wide"] == []


def test_a_tensorboard_log_directory_is_a_run(tmp_path):
    """TensorBoard's own writer (the one Lightning's TensorBoardLogger uses) as the reference."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "tb" / "version_0"
    writer = SummaryWriter(str(run_dir))
    logged = {"train/loss": {0: 2.0, 5: 1.5, 10: 1.25}, "geometry/blocks.0.ffn/tokens_total": {0: 64.0, 10: 64.0}}
    for key, values in logged.items():
        for step, value in values.items():
            writer.add_scalar(key, value, step)
    writer.add_histogram("geometry/blocks.0.ffn/jac_spectrum", np.array([1.0, 0.5]), 10)
    writer.close()
    (run_dir / "hparams.yaml").write_text("config:\n  routing: soft\n  input_dim: 8\nseed: 4\n")
    (run,) = discover_runs([str(tmp_path)])
    assert (run.source, run.routing, run.seed, run.family, run.status) == ("tensorboard", "soft", 4, "mlp", "done")
    assert run.keys == set(logged)  # the histogram is not a scalar
    assert list(run.history.index) == [0, 5, 10]
    for key, values in logged.items():
        assert run.history[key].dropna().to_dict() == values
