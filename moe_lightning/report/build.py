"""``build_report``: the training report of a set of runs, written as results and claims tables (Markdown, CSV),
the claims at every probe step (CSV and a small-multiples figure), the figures and one HTML page; for a single run
the page is its interactive dashboard (:mod:`moe_lightning.report.dashboard`)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import pandas as pd

from moe_lightning.analysis.choices import FORMATS, LAYER_MODES
from moe_lightning.analysis.claims import claims_over_training, comparable, verdict_since
from moe_lightning.analysis.decision import DECISION_RULE
from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.results import results_table, seed_values
from moe_lightning.analysis.run import CONTROLS, Run
from moe_lightning.analysis.steps import stale_final_values, step_values
from moe_lightning.report import html as page
from moe_lightning.report.claims_render import claims_display, claims_table, multiple_comparison_note
from moe_lightning.report.format import markdown_table
from moe_lightning.report.tables import UNDERSAMPLED_MARK, results_display


def _runs_frame(runs: list[Run]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "arm": r.arm or "?",
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
        "(ddof=1) over seeds; n seeds per row; final step: the probe step the final values come from (the oldest "
        "over seeds and layers). "
        + (
            "Layer mode `mean`: each seed's value is first averaged over the run's MoE layers."
            if layer_mode == "mean"
            else "Layer mode `each`: one row per routing and layer."
        )
        + " `/mean` keys are means over a layer's experts. n/a: not logged (e.g. alignment of the dense baseline)."
        + f" ({UNDERSAMPLED_MARK}u/n): a PCA value that rests, in u of its n seeds, on an expert whose effective "
        "sample size n_eff = (Σw)²/Σw² is below the site's width D (its covariance is rank-deficient by sampling)."
    )


def _claims_preamble(claims: pd.DataFrame, threshold: float) -> list[str]:
    """The paragraphs above the claims table: the rule, the multiple-comparison note, the threshold and the controls
    the runs lack."""
    missing = [c for c in CONTROLS if c not in set(claims["control"])]
    lacking = [f"Not tested against {', '.join(missing)}: no finished runs of that arm."] if missing else []
    return [DECISION_RULE, multiple_comparison_note(claims), f"C3 threshold: {threshold:g}.", *lacking]


@dataclass
class _Shown:
    """The tables as people read them, with the text above each: the results caption, the claims preamble."""

    caption: str
    results: pd.DataFrame
    claims: pd.DataFrame | None
    preamble: list[str]


def _write_markdown(out_dir: str, shown: _Shown, left_out: list[Run]) -> list[str]:
    """``results.md`` (with the runs left out of the statistics) and, when there is a comparison, ``claims.md``."""
    failed_lines = [f"- {r.label}: {r.status} ({r.note}) — `{r.path}`" for r in left_out]
    results_path = os.path.join(out_dir, "results.md")
    with open(results_path, "w") as handle:
        handle.write(f"# Results\n\n{shown.caption}\n\n{markdown_table(shown.results)}\n")
        if failed_lines:
            handle.write("\nLeft out of the statistics (failed or incomplete):\n\n" + "\n".join(failed_lines) + "\n")
    if shown.claims is None:
        return [results_path]
    claims_path = os.path.join(out_dir, "claims.md")
    with open(claims_path, "w") as handle:
        handle.write("# Claims\n\n" + "\n\n".join(shown.preamble) + "\n\n" + markdown_table(shown.claims) + "\n")
    return [results_path, claims_path]


def _write_csv(out_dir: str, frames: dict[str, pd.DataFrame | None]) -> list[str]:
    """Each frame as ``<name>.csv``, unformatted (None: not written)."""
    written = []
    for name, frame in frames.items():
        if frame is not None:
            written.append(os.path.join(out_dir, f"{name}.csv"))
            frame.to_csv(written[-1], index=False)
    return written


def _write_dashboard(out_dir: str, run: Run, shown: _Shown) -> str:
    """The page of a single run (:mod:`moe_lightning.report.run_page`)."""
    from moe_lightning.report.run_page import write_run_page

    return write_run_page(out_dir, run, shown.results, shown.caption, page.table_html(_runs_frame([run])))


def _write_overview(out_dir: str, runs: list[Run], shown: _Shown, training: pd.DataFrame | None, summary: str) -> str:
    """The page of several runs: summary, results, claims, the interactive figures and the runs found."""
    from moe_lightning.report.charts import plotly_script
    from moe_lightning.report.run_page import runs_settings_block
    from moe_lightning.report.sweep_charts import interactive_figures

    keys = [c for c in ("family", "arm", "layer", "n seeds") if c in shown.results]
    sections = [
        ("Summary", page.paragraph(summary) + runs_settings_block(runs)),
        ("Results", page.paragraph(shown.caption, "caption") + page.split_tables(shown.results, keys)),
    ]
    if shown.claims is not None:
        text = "".join(page.paragraph(p, "caption") for p in shown.preamble)
        claim_keys = [c for c in ("family", "claim", "comparison") if c in shown.claims]
        sections.append(("Claims", text + page.split_tables(shown.claims, claim_keys, per_table=7)))
    sections += [("Figures", interactive_figures(runs, training)), ("Runs", page.table_html(_runs_frame(runs)))]
    path = os.path.join(out_dir, "index.html")
    return page.write_page(path, "moe-lightning report", sections, head=plotly_script(), contents=True)


def _claims(
    runs: list[Run], values: pd.DataFrame, layer_mode: str, threshold: float
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The claims table, with the step since which each verdict has held, and the claims over training; both None
    when the runs compare nothing (one arm alone, e.g. a single run: no table of empty verdicts)."""
    claims = claims_table(values, threshold)
    if not comparable(claims):
        return None, None
    training = claims_over_training(step_values(runs, layer_mode), threshold)
    return verdict_since(claims, training), training


def _figures(
    runs: list[Run], out_dir: str, formats: tuple[str, ...], training: pd.DataFrame | None
) -> tuple[dict[str, str | None], dict[str, str]]:
    """The PNG figures (and the claims over training), for the PNG format: ``(images, notes)``. The HTML pages draw
    the same data as interactive charts."""
    if "png" not in formats:
        return {}, {}
    # matplotlib and torch (the figures read the saved reports as tensors) load only for the figure formats.
    from moe_lightning.report.figures import claims_over_training_figure, write_figures

    images, notes = write_figures(runs, out_dir)
    if training is not None:
        path = claims_over_training_figure(training, os.path.join(out_dir, "claims_over_training.png"))
        images["claims_over_training.png"] = path
        if path is None:
            notes["claims_over_training.png"] = "no claim has a paired seed at any probe step"
    return images, notes


def _check_arguments(directories: list[str], layer_mode: str, formats: tuple[str, ...]) -> None:
    if not directories:
        raise ValueError("no run directories given; pass at least one directory")
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode={layer_mode!r} is not supported; allowed values: {', '.join(LAYER_MODES)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats {unknown or '[]'} not supported; allowed values: {', '.join(FORMATS)}")


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
    _check_arguments(directories, layer_mode, formats)
    runs = discover_runs(directories)
    out_dir = out_dir or os.path.join(directories[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    values = seed_values(runs, layer_mode)
    results = results_table(values)
    claims, training = _claims(runs, values, layer_mode, threshold)
    # runs whose final values describe an earlier model than the trained one: said on the terminal and in the tables
    stale = []
    for line in stale_final_values(runs):
        warnings.warn(f"moe-lightning report: {line}", stacklevel=2)
        stale.append(f"Warning: {line}.")
    shown = _Shown(
        " ".join([_caption(layer_mode), *stale]),
        results_display(results),
        None if claims is None else claims_display(claims),
        [] if claims is None else [*_claims_preamble(claims, threshold), *stale],
    )
    written: list[str] = []
    if "md" in formats:
        written += _write_markdown(out_dir, shown, [r for r in runs if not r.ok])
    if "csv" in formats:
        written += _write_csv(out_dir, {"results": results, "claims": claims, "claims_over_training": training})
    images, notes = _figures(runs, out_dir, formats, training)
    written.extend(p for p in images.values() if p is not None)
    if "html" in formats and len(runs) == 1:
        written.append(_write_dashboard(out_dir, runs[0], shown))
    elif "html" in formats:
        done = sum(r.ok for r in runs)
        summary = (
            f"{len(runs)} runs found, {done} finished and used, {len(runs) - done} left out. "
            f"Layer mode: {layer_mode}. C3 threshold: {threshold:g}."
        )
        written.append(_write_overview(out_dir, runs, shown, training, summary))
    return written
