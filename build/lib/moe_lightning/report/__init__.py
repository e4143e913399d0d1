"""``moe-lightning report``: results table, claims table, plots and one HTML page from training runs.

Example (shell)::

    moe-lightning report runs/sweep-mlp --out runs/sweep-mlp/report
    moe-lightning report runs/a runs/b --layer-mode each --threshold 0.05

Python::

    from moe_lightning.report import build_report, render_probe
    paths = build_report(["runs/sweep-mlp"])
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import pandas as pd

from moe_lightning.report import html as page
from moe_lightning.report import plots
from moe_lightning.report.probe import (
    PLOTTED_PCA_SITES,
    alignment_title,
    expert_mean_pca,
    expert_mean_spectrum,
    render_probe,
)
from moe_lightning.report.runs import Run, discover_runs, final_geometry, layer_names
from moe_lightning.report.tables import (
    DECISION_RULE,
    LAYER_MODES,
    Decision,
    claims_display,
    claims_table,
    decide,
    decide_threshold,
    markdown_table,
    results_display,
    results_table,
    seed_values,
)

__all__ = [
    "DECISION_RULE",
    "Decision",
    "build_report",
    "decide",
    "decide_threshold",
    "discover_runs",
    "main",
    "render_probe",
]

FORMATS = ("md", "csv", "png", "html")
MAX_LAYER_PANELS = 4
MAX_PCA_LAYERS = 3  # two sites per layer


def _label(run: Run, multi_family: bool) -> str:
    return f"{run.family or '?'}:{run.routing}" if multi_family else str(run.routing)


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Finished runs by routing (``family:routing`` when several families are present), dense/topk/soft first,
    seeds ascending within a group."""
    done = [r for r in runs if r.ok]
    multi_family = len({r.family for r in done}) > 1
    order = {"dense": 0, "topk": 1, "soft": 2}
    done.sort(key=lambda r: (r.family or "", order.get(r.routing or "", 3), r.seed if r.seed is not None else 1 << 30))
    groups: dict[str, list[Run]] = {}
    for run in done:
        groups.setdefault(_label(run, multi_family), []).append(run)
    return groups


def _runs_frame(runs: list[Run]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "routing": r.routing or "?",
                "seed": "?" if r.seed is None else r.seed,
                "family": r.family or "?",
                "status": r.status,
                "source": r.source,
                "directory": r.path,
                "note": r.note,
            }
            for r in runs
        ]
    )


def _layers_in_order(reports: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for layers in reports for name in layers))


def _figures(runs: list[Run], out_dir: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """Write the five figures; a figure without data (or one that fails) is skipped with a note."""
    groups = _groups(runs)
    finals: dict[str, list[tuple[int | None, dict[str, Any]]]] = {}
    for label, members in groups.items():
        for run in members:
            loaded = final_geometry(run)
            if loaded is not None:
                finals.setdefault(label, []).append((run.seed, loaded[1]))
    all_reports = [layers for entries in finals.values() for _, layers in entries]
    layers = _layers_in_order(all_reports)
    shown_layers = layers[:MAX_LAYER_PANELS]
    more = f" (first {MAX_LAYER_PANELS} of {len(layers)} layers)" if len(layers) > MAX_LAYER_PANELS else ""
    images: dict[str, str | None] = {}
    notes: dict[str, str] = {}

    def attempt(name: str, missing: str, make) -> None:
        try:
            path = make()
        except Exception as error:  # a figure must never stop the report; say why it is missing
            plots.plt.close("all")
            images[name], notes[name] = None, f"failed: {error!r}"
            return
        images[name] = path
        if path is None:
            notes[name] = missing

    def spectra() -> str | None:
        panels = []
        for layer in shown_layers:
            series = {
                label: [s for _, lay in entries if layer in lay and (s := expert_mean_spectrum(lay[layer])) is not None]
                for label, entries in finals.items()
            }
            series = {k: v for k, v in series.items() if v}
            if series:
                panels.append((layer, series))
        if not panels:
            return None
        return plots.plot_spectrum_panels(
            panels,
            os.path.join(out_dir, "spectra.png"),
            f"Mean expert-Jacobian spectrum, final probe step{more}\n"
            "(experts averaged with weights Σw; mean over seeds, min–max over seeds shaded)",
            ylabel="singular value σ_i",
        )

    def curves() -> str | None:
        panels = []
        for key, title, ylabel in (
            ("jac_sigma_max/mean", "σ_max (expert mean), mean over layers", "σ_max"),
            ("jac_effective_rank/mean", "Jacobian effective rank (expert mean), mean over layers", "effective rank"),
        ):
            series: dict[str, list[pd.Series]] = {}
            for label, members in groups.items():
                for run in members:
                    columns = [f"geometry/{la}/{key}" for la in layer_names(run.history)]
                    columns = [c for c in columns if c in run.history.columns]
                    if columns:
                        series.setdefault(label, []).append(run.history[columns].mean(axis=1, skipna=True).dropna())
            if series:
                panels.append((title, ylabel, series))
        if not panels:
            return None
        return plots.plot_curve_panels(
            panels, os.path.join(out_dir, "curves.png"), "Geometry over training (mean over seeds, min–max band)"
        )

    def alignment() -> str | None:
        items = []
        for label, entries in finals.items():
            for layer in shown_layers:
                for seed, lay in entries:  # the first seed (lowest) that has this layer's matrix
                    report = lay.get(layer)
                    if report is not None and report.num_experts > 1 and "align_mean_jacobian" in report.matrices:
                        title = alignment_title(f"{label}, {layer}, seed {seed}", report)
                        items.append((title, report.matrices["align_mean_jacobian"].double().numpy()))
                        break
        if not items:
            return None
        return plots.plot_heatmaps(
            items,
            os.path.join(out_dir, "alignment.png"),
            "Mean-Jacobian alignment |cos(J̄_i, J̄_j)| at the final probe step (chance: E|cos| of Gaussian matrices)",
        )

    def pca() -> str | None:
        panels = []
        for site in PLOTTED_PCA_SITES:
            for layer in layers[:MAX_PCA_LAYERS]:
                series = {
                    label: [
                        v for _, lay in entries if layer in lay and (v := expert_mean_pca(lay[layer], site)) is not None
                    ]
                    for label, entries in finals.items()
                }
                series = {k: v for k, v in series.items() if v}
                if series:
                    panels.append((f"{site} site, {layer}", series))
        if not panels:
            return None
        return plots.plot_spectrum_panels(
            panels,
            os.path.join(out_dir, "pca_spectra.png"),
            "Weighted PCA eigenvalues at the final probe step (expert mean, Σw-weighted; mean over seeds)"
            + (f" (first {MAX_PCA_LAYERS} of {len(layers)} layers)" if len(layers) > MAX_PCA_LAYERS else ""),
            ylabel="eigenvalue λ_k",
            xlabel="component k",
        )

    def router_load() -> str | None:
        panels = []
        for label, members in groups.items():
            if members[0].routing == "dense":
                continue
            run = members[0]  # expert identities differ between seeds: show one seed
            prefixes = dict.fromkeys(
                c.rsplit("/load/", 1)[0] for c in run.history.columns if "/load/e" in str(c) and c.startswith("router/")
            )
            for prefix in list(prefixes)[:MAX_LAYER_PANELS]:
                columns = sorted(
                    (c for c in run.history.columns if str(c).startswith(f"{prefix}/load/e")),
                    key=lambda c: int(c.rsplit("/e", 1)[1]),
                )
                frame = run.history[columns].dropna(how="all")
                frame.columns = [c.rsplit("/", 1)[1] for c in columns]
                if not frame.empty:
                    panels.append((f"{label}, {prefix.split('/', 1)[1]}, seed {run.seed}", frame))
        if not panels:
            return None
        return plots.plot_router_load(
            panels, os.path.join(out_dir, "router_load.png"), "Router load: share of routed assignments per expert"
        )

    attempt("spectra.png", "no run has geometry/step_*.json reports with Jacobian spectra", spectra)
    attempt("curves.png", "no run logged geometry/<layer>/jac_sigma_max/mean", curves)
    attempt("alignment.png", "no MoE run has an alignment matrix in its geometry reports", alignment)
    attempt("pca_spectra.png", "no run has PCA eigenvalues in its geometry reports", pca)
    attempt("router_load.png", "no MoE run logged router/<layer>/load/e<i> keys", router_load)
    return images, notes


def build_report(
    directories: list[str],
    out_dir: str | None = None,
    layer_mode: str = "mean",
    threshold: float = 0.1,
    formats: tuple[str, ...] = FORMATS,
) -> list[str]:
    """Find the runs under ``directories`` and write the report.

    Args:
        directories: run directories or directories containing runs (searched recursively).
        out_dir: output directory; default ``<directories[0]>/report``.
        layer_mode: ``"mean"`` (each seed's value averaged over layers) or ``"each"`` (one row per layer).
        threshold: absolute threshold of claim C3 on ``align_mean_offdiag``.
        formats: which outputs to write, among ``"md"``, ``"csv"``, ``"png"``, ``"html"``.

    Returns:
        The paths written.

    Raises:
        ValueError: bad arguments, a directory without runs, or the same (routing, seed) twice.
    """
    if not directories:
        raise ValueError("no run directories given; pass at least one directory")
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode={layer_mode!r} is not supported; allowed values: {', '.join(LAYER_MODES)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats {unknown or '[]'} not supported; allowed values: {', '.join(FORMATS)}")
    runs = discover_runs(directories)
    out_dir = out_dir or os.path.join(directories[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    values = seed_values(runs, layer_mode)
    results = results_table(values)
    claims = claims_table(values, threshold)
    shown_results, shown_claims = results_display(results), claims_display(claims)
    left_out = [r for r in runs if not r.ok]
    caption = (
        "Final value of each run (its last logged probe step; losses: last logged value), as mean ± sample std "
        "(ddof=1) over seeds; n seeds per row. "
        + (
            "Layer mode `mean`: each seed's value is first averaged over the run's MoE layers."
            if layer_mode == "mean"
            else "Layer mode `each`: one row per routing and layer."
        )
        + " `/mean` keys are means over a layer's experts. n/a: not logged (e.g. alignment of the dense baseline)."
    )
    failed_lines = [f"- {r.label}: {r.status} ({r.note}) — `{r.path}`" for r in left_out]
    written: list[str] = []
    if "md" in formats:
        path = os.path.join(out_dir, "results.md")
        with open(path, "w") as handle:
            handle.write(f"# Results\n\n{caption}\n\n{markdown_table(shown_results)}\n")
            if failed_lines:
                handle.write(
                    "\nLeft out of the statistics (failed or incomplete):\n\n" + "\n".join(failed_lines) + "\n"
                )
        written.append(path)
        path = os.path.join(out_dir, "claims.md")
        with open(path, "w") as handle:
            handle.write(f"# Claims\n\n{DECISION_RULE}\n\nC3 threshold: {threshold:g}.\n\n")
            handle.write((markdown_table(shown_claims) if not shown_claims.empty else "(no finished runs)") + "\n")
        written.append(path)
    if "csv" in formats:
        results.to_csv(path := os.path.join(out_dir, "results.csv"), index=False)
        written.append(path)
        claims.to_csv(path := os.path.join(out_dir, "claims.csv"), index=False)
        written.append(path)
    images: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    if "png" in formats or "html" in formats:
        images, notes = _figures(runs, out_dir)
        written.extend(p for p in images.values() if p is not None)
    if "html" in formats:
        done = sum(r.ok for r in runs)
        summary = (
            f"{len(runs)} runs found, {done} finished and used, {len(runs) - done} left out. "
            f"Layer mode: {layer_mode}. C3 threshold: {threshold:g}."
        )
        sections = [
            ("Summary", page.paragraph(summary)),
            ("Results", page.paragraph(caption, "caption") + page.table_html(shown_results)),
            ("Claims", page.paragraph(DECISION_RULE, "caption") + page.table_html(shown_claims)),
            ("Figures", page.figures_html(images, notes)),
            ("Runs", page.table_html(_runs_frame(runs))),
        ]
        written.append(page.write_page(os.path.join(out_dir, "index.html"), "moe-lightning report", sections))
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lightning report",
        description="Results table (mean ± std over seeds), the papers' claims with verdicts, plots and one HTML page "
        "from sweep job directories, CSV log directories and W&B offline runs (searched recursively).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or directories containing runs")
    parser.add_argument("--out", default=None, help="output directory (default: <first RUN_DIR>/report)")
    parser.add_argument(
        "--layer-mode",
        choices=LAYER_MODES,
        default="mean",
        help="mean: average each seed's value over layers (default); each: one row per layer",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.1, help="C3: absolute threshold on align_mean_offdiag (default 0.1)"
    )
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        dest="formats",
        help="outputs to write (default: all of md csv png html)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``moe-lightning report``.

    Args:
        argv: the arguments after ``report``.

    Returns:
        0 on success; 2 (after ``moe-lightning: error: ...`` on stderr) for bad input.
    """
    args = _parser().parse_args(argv)
    try:
        written = build_report(args.run_dirs, args.out, args.layer_mode, args.threshold, tuple(args.formats))
    except ValueError as error:
        print(f"moe-lightning: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
