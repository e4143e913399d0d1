"""The W&B workspace and report of the geometry, built with W&B's own ``wandb-workspaces`` library from the keys
that runs logged, so that no panel points at a key no run writes.

Python, for a project of your own::

    from moe_lightning.report.workspace import geometry_report, geometry_sections, geometry_workspace

    keys = {"train/loss", "geometry/blocks.0.ffn/tokens_total", "geometry/blocks.0.ffn/jac_sigma_max/mean"}
    workspace = geometry_workspace("my-team", "my-project", keys)
    # workspace.save() creates the saved view (network and credentials needed)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr

from moe_lightning.analysis.timeline import STABILITY_THRESHOLDS

# Every callback logs at the trainer's step and defines it as the W&B step metric (callbacks/_observe.py).
STEP = "trainer/global_step"
# The routing of a moe-lightning model sits in the LightningModule's `config` hyperparameter.
ROUTING_KEY = "config.routing"
ROUTING = wr.Config(ROUTING_KEY)
SPECTRA_TABLE = "geometry/spectra"
SPECTRA_CHART = "moe-lightning-spectra"
# The columns GeometryMonitor writes into the spectra table, by the names the chart's Vega-Lite spec uses.
SPECTRA_FIELDS = {"step": "step", "layer": "layer", "expert": "expert", "index": "index", "sigma": "sigma"}

# (quantity under geometry/<layer>/, panel title) of the per-layer Jacobian section.
JACOBIAN_QUANTITIES = (
    ("jac_sigma_max/mean", "σ_max (expert mean)"),
    ("jac_decay_slope/mean", "spectral decay slope (expert mean)"),
    ("jac_effective_rank/mean", "Jacobian effective rank (expert mean)"),
)
PCA_SITES = ("input", "hidden", "output")
# (panel title, quantities drawn together: the measured ones and, last, their chance level).
ALIGNMENT_PANELS = (
    ("Jacobian alignment vs chance", ("align_mean_offdiag", "palign_mean_offdiag", "align_chance")),
    ("alignment / chance", ("align_ratio", "palign_ratio")),
    ("subspace overlaps vs chance r/d", ("subspace_fun_overlap", "subspace_rep_overlap", "subspace_overlap_chance")),
)
ROUTER_QUANTITIES = (
    ("load_cv", "load coefficient of variation"),
    ("dead_fraction", "dead experts (fraction)"),
    ("entropy", "routing entropy"),
    ("margin", "top-k margin"),
    ("dropped_fraction", "dropped tokens (fraction)"),
    ("utilisation_max", "largest expert utilisation"),
)
CURVATURE_QUANTITIES = (
    ("curvature/hessian_top_eigenvalue", "Hessian top eigenvalue"),
    ("curvature/hessian_lambda_min", "Hessian smallest eigenvalue"),
    ("curvature/hessian_trace", "Hessian trace"),
)


def spectra_chart_spec() -> dict:
    """The Vega-Lite spec of the spectra custom chart: σ_i against i (log–log), one line per layer and expert, at the
    probe nearest to a "training progress" slider (0 = the first probe, 1 = the last), so the slider walks the
    spectrum through training whatever the probe schedule was."""
    field = {name: f"${{field:{name}}}" for name in SPECTRA_FIELDS}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "description": "Expert-Jacobian singular values at one probe step, chosen with the slider",
        "data": {"name": "wandb"},
        "params": [
            {
                "name": "progress",
                "value": 1,
                "bind": {"input": "range", "min": 0, "max": 1, "step": 0.01, "name": "training progress "},
            }
        ],
        "transform": [
            {"joinaggregate": [{"op": "min", "field": field["step"], "as": "first_step"}]},
            {"joinaggregate": [{"op": "max", "field": field["step"], "as": "last_step"}]},
            {
                "calculate": f"abs(datum['{field['step']}'] - (datum.first_step + progress * "
                "(datum.last_step - datum.first_step)))",
                "as": "distance",
            },
            {"joinaggregate": [{"op": "min", "field": "distance", "as": "nearest"}]},
            {"filter": "datum.distance == datum.nearest"},
            {"filter": f"datum['{field['sigma']}'] > 0"},
        ],
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": field["index"], "type": "quantitative", "scale": {"type": "log"}, "title": "index i"},
            "y": {"field": field["sigma"], "type": "quantitative", "scale": {"type": "log"}, "title": "σ_i"},
            "color": {"field": field["layer"], "type": "nominal", "title": "layer"},
            "detail": {"field": field["expert"], "type": "nominal"},
            "tooltip": [
                {"field": field["step"], "type": "quantitative", "title": "step"},
                {"field": field["layer"], "type": "nominal"},
                {"field": field["expert"], "type": "nominal"},
                {"field": field["index"], "type": "quantitative"},
                {"field": field["sigma"], "type": "quantitative"},
            ],
        },
        "title": {"text": "Expert-Jacobian spectrum at the probe step nearest the slider"},
    }


@dataclass
class PanelSection:
    """One section of the workspace (and one heading and panel grid of the report)."""

    name: str
    panels: list


def _layers(keys: set[str], prefix: str, marker: str) -> list[str]:
    """Layer names ``<layer>`` of the keys ``<prefix>/<layer>/<marker>``, sorted (``router/mean`` left out)."""
    found = {m.group(1) for k in keys if (m := re.fullmatch(rf"{prefix}/(.+)/{re.escape(marker)}", k))}
    return sorted(found - {"mean"})


def _line(keys: set[str], title: str, ys: Iterable[str], log_y: bool = False, grouped: bool = True) -> list:
    """A line plot of the ``ys`` the runs logged, against the trainer step, routings as line groups (mean over a
    routing's runs, min–max band); nothing when none of the ``ys`` was logged."""
    present = [y for y in ys if y in keys]
    if not present:
        return []
    group = {"groupby": ROUTING, "groupby_aggfunc": "mean", "groupby_rangefunc": "minmax"} if grouped else {}
    return [wr.LinePlot(title=title, x=STEP, y=present, log_y=log_y or None, title_x="training step", **group)]


def _stability_panels(keys: set[str]) -> list:
    """For each logged edge-of-stability threshold (the whole model's and each parameter group's), one line plot of
    the sharpness it bounds with the threshold beside it (:data:`STABILITY_THRESHOLDS`)."""
    panels = []
    for key in sorted(keys):
        prefix, _, threshold = key.rpartition("/")
        if prefix.startswith("curvature") and threshold in STABILITY_THRESHOLDS:
            sharpness = f"{prefix}/{STABILITY_THRESHOLDS[threshold]}"
            title = f"{prefix.removeprefix('curvature').strip('/') or 'model'}: {sharpness.rpartition('/')[2]} vs"
            panels += _line(keys, f"{title} {threshold}", [sharpness, key]) if sharpness in keys else []
    return panels


def _per_layer(keys: set[str], prefix: str, layers: list[str], panels: Iterable[tuple[str, Iterable[str]]]) -> list:
    """For each layer, one line plot per ``(title, quantities)`` of ``panels``: the keys
    ``<prefix>/<layer>/<quantity>``, titled ``"<layer>: <title>"``."""
    return [
        panel
        for layer in layers
        for title, quantities in panels
        for panel in _line(keys, f"{layer}: {title}", [f"{prefix}/{layer}/{q}" for q in quantities])
    ]


def geometry_sections(keys: Iterable[str], entity: str = "", chart_entity: str | None = None) -> list[PanelSection]:
    """The panels of the geometry workspace, grouped in sections, for runs that logged ``keys``.

    Sections: loss; per-layer σ_max, decay slope and effective rank; PCA effective ranks per site; alignment and
    subspace overlaps against their chance levels; router health; curvature; the spectra table as a custom chart
    with a step slider. A section none of whose keys was logged is left out.

    Args:
        keys: every key the runs logged (scalars and media, e.g. ``geometry/spectra``).
        entity: the W&B entity; the spectra chart preset is ``<entity>/moe-lightning-spectra``.
        chart_entity: the entity owning the chart preset when it is not ``entity``.
    """
    keys = set(keys)
    layers = _layers(keys, "geometry", "tokens_total")
    pca = [(f"{site} site effective rank", [f"pca_{site}_effective_rank/mean"]) for site in PCA_SITES]
    sections = [
        PanelSection(
            "Loss",
            _line(keys, "training loss", ["train/loss", "train/task_loss"], log_y=True)
            + _line(keys, "validation loss", ["val/loss", "val/task_loss"], log_y=True)
            + _line(keys, "auxiliary losses", ["train/aux_load_balance", "train/aux_z_loss"]),
        ),
        PanelSection(
            "Jacobian spectra per layer",
            _per_layer(keys, "geometry", layers, [(title, [quantity]) for quantity, title in JACOBIAN_QUANTITIES]),
        ),
        PanelSection("PCA effective rank per site", _per_layer(keys, "geometry", layers, pca)),
        PanelSection(
            "Alignment and subspace overlap vs chance", _per_layer(keys, "geometry", layers, ALIGNMENT_PANELS)
        ),
        PanelSection(
            "Router health",
            _per_layer(
                keys,
                "router",
                [*_layers(keys, "router", "load_cv"), "mean"],
                [(title, [quantity]) for quantity, title in ROUTER_QUANTITIES],
            ),
        ),
        PanelSection(
            "Curvature",
            [panel for key, title in CURVATURE_QUANTITIES for panel in _line(keys, title, [key])]
            + _stability_panels(keys),
        ),
    ]
    if SPECTRA_TABLE in keys:
        sections.append(PanelSection("Spectra over training", [_spectra_chart(entity, chart_entity)]))
    return [s for s in sections if s.panels]


def _spectra_chart(entity: str, chart_entity: str | None) -> wr.CustomChart:
    """The spectra table as the custom chart with a step slider (its preset owned by ``chart_entity`` or
    ``entity``)."""
    owner = chart_entity if chart_entity is not None else entity
    return wr.CustomChart(
        # historyTable: every logged version of the table (one per probe), not only the last one.
        query={"historyTable": {"tableKey": SPECTRA_TABLE}},
        chart_name=f"{owner}/{SPECTRA_CHART}",
        chart_fields=dict(SPECTRA_FIELDS),
    )


def geometry_workspace(
    entity: str,
    project: str,
    keys: Iterable[str],
    name: str = "moe-lightning geometry",
    filters: str = "",
) -> ws.Workspace:
    """The saved-view workspace of :func:`geometry_sections` (not saved; call ``.save()`` online).

    Args:
        entity: W&B entity (user or team).
        project: W&B project.
        keys: every key the runs logged.
        name: the view's name.
        filters: a run filter in ``wandb-workspaces``' expression syntax, e.g. ``"Config('config.routing') = 'topk'"``.
    """
    sections = [ws.Section(name=s.name, panels=s.panels, is_open=True) for s in geometry_sections(keys, entity=entity)]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP),
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[expr.Config(ROUTING_KEY)]),
    )


def geometry_report(
    entity: str, project: str, keys: Iterable[str], title: str = "moe-lightning geometry", filters: str = ""
) -> wr.Report:
    """The same sections as a W&B report: a heading and a panel grid per section (not saved; ``.save()`` online)."""
    blocks: list = [wr.P("Geometry of every MoE layer over training, one line group per routing.")]
    for section in geometry_sections(keys, entity=entity):
        runset = wr.Runset(entity=entity, project=project, filters=filters, groupby=[f"config.{ROUTING_KEY}"])
        blocks += [wr.H2(section.name), wr.PanelGrid(runsets=[runset], panels=section.panels)]
    return wr.Report(project=project, entity=entity, title=title, blocks=blocks)
