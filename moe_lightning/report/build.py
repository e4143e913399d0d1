"""``build_report``: the training report of a set of runs, written as results and claims tables (Markdown, CSV),
the figures and one HTML page; for a single run the page is its interactive dashboard
(:mod:`moe_lightning.report.dashboard`), and claims, which compare routings, appear only when there are several."""

from __future__ import annotations

import os

import pandas as pd

from moe_lightning.report import html as page
from moe_lightning.report.dashboard import dashboard_sections, plotly_script
from moe_lightning.report.figures import group_runs, write_figures
from moe_lightning.report.runs import Run, discover_runs
from moe_lightning.report.tables import (
    DECISION_RULE,
    LAYER_MODES,
    claims_display,
    claims_table,
    markdown_table,
    results_display,
    results_table,
    seed_values,
)

FORMATS = ("md", "csv", "png", "html")
# The report's static figures that a run's dashboard also embeds: what its interactive charts do not show.
DASHBOARD_FIGURES = ("curvature_density.png",)


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


def _caption(layer_mode: str) -> str:
    return (
        "Final value of each run (its last logged probe step; losses: last logged value), as mean ± sample std "
        "(ddof=1) over seeds; n seeds per row. "
        + (
            "Layer mode `mean`: each seed's value is first averaged over the run's MoE layers."
            if layer_mode == "mean"
            else "Layer mode `each`: one row per routing and layer."
        )
        + " `/mean` keys are means over a layer's experts. n/a: not logged (e.g. alignment of the dense baseline)."
    )


def _write_markdown(
    out_dir: str,
    caption: str,
    results: pd.DataFrame,
    claims: pd.DataFrame | None,
    left_out: list[Run],
    threshold: float,
) -> list[str]:
    """``results.md`` (with the runs left out of the statistics) and ``claims.md`` (when there are claims)."""
    failed_lines = [f"- {r.label}: {r.status} ({r.note}) — `{r.path}`" for r in left_out]
    results_path = os.path.join(out_dir, "results.md")
    with open(results_path, "w") as handle:
        handle.write(f"# Results\n\n{caption}\n\n{markdown_table(results)}\n")
        if failed_lines:
            handle.write("\nLeft out of the statistics (failed or incomplete):\n\n" + "\n".join(failed_lines) + "\n")
    if claims is None:
        return [results_path]
    claims_path = os.path.join(out_dir, "claims.md")
    with open(claims_path, "w") as handle:
        handle.write(f"# Claims\n\n{DECISION_RULE}\n\nC3 threshold: {threshold:g}.\n\n")
        handle.write((markdown_table(claims) if not claims.empty else "(no finished runs)") + "\n")
    return [results_path, claims_path]


def _write_csv(out_dir: str, results: pd.DataFrame, claims: pd.DataFrame | None) -> list[str]:
    """``results.csv`` and ``claims.csv`` (when there are claims), unformatted."""
    results_path = os.path.join(out_dir, "results.csv")
    results.to_csv(results_path, index=False)
    if claims is None:
        return [results_path]
    claims_path = os.path.join(out_dir, "claims.csv")
    claims.to_csv(claims_path, index=False)
    return [results_path, claims_path]


def _write_dashboard(
    out_dir: str, run: Run, summary: str, results: tuple[str, pd.DataFrame], images: dict, notes: dict
) -> str:
    """The page of a single run: its summary and final values, its dashboard, the static figures it lacks."""
    caption, shown_results = results
    static = {name: path for name, path in images.items() if name in DASHBOARD_FIGURES}
    sections = [
        ("Summary", page.paragraph(summary)),
        ("Final values", page.paragraph(caption, "caption") + page.table_html(shown_results)),
        *dashboard_sections(run),
        *([("Hessian spectral density", page.figures_html(static, notes))] if static else []),
        ("Run", page.table_html(_runs_frame([run]))),
    ]
    title = f"moe-lightning run: {run.label}"
    return page.write_page(os.path.join(out_dir, "index.html"), title, sections, head=plotly_script(), contents=True)


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
    # The claims compare routings: with a single routing (one run, or seeds of one) they only say "inconclusive".
    compared = len(group_runs(runs)) > 1
    caption = _caption(layer_mode)
    written: list[str] = []
    if "md" in formats:
        written += _write_markdown(
            out_dir,
            caption,
            shown_results,
            shown_claims if compared else None,
            [r for r in runs if not r.ok],
            threshold,
        )
    if "csv" in formats:
        written += _write_csv(out_dir, results, claims if compared else None)
    images: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    if "png" in formats or "html" in formats:
        # A single run's page is its dashboard, which embeds only some figures: draw those unless PNGs are asked.
        only = DASHBOARD_FIGURES if len(runs) == 1 and "png" not in formats else None
        images, notes = write_figures(runs, out_dir, only)
        written.extend(p for p in images.values() if p is not None)
    if "html" in formats and len(runs) == 1:
        run = runs[0]
        summary = f"{run.label}, {run.family or '?'} model, read from {run.source} logs in {run.path}: {run.status}."
        written.append(_write_dashboard(out_dir, run, summary, (caption, shown_results), images, notes))
    elif "html" in formats:
        done = sum(r.ok for r in runs)
        summary = (
            f"{len(runs)} runs found, {done} finished and used, {len(runs) - done} left out. "
            f"Layer mode: {layer_mode}. C3 threshold: {threshold:g}."
        )
        sections = [
            ("Summary", page.paragraph(summary)),
            ("Results", page.paragraph(caption, "caption") + page.table_html(shown_results)),
            *(
                [("Claims", page.paragraph(DECISION_RULE, "caption") + page.table_html(shown_claims))]
                if compared
                else []
            ),
            ("Figures", page.figures_html(images, notes)),
            ("Runs", page.table_html(_runs_frame(runs))),
        ]
        written.append(page.write_page(os.path.join(out_dir, "index.html"), "moe-lightning report", sections))
    return written
