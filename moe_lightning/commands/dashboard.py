"""``moe-lightning dashboard``: create or update the W&B workspace (and, with ``--report``, a report) of the
geometry (:mod:`moe_lightning.report.workspace`), from the keys of local runs or of the project's runs.

Examples::

    moe-lightning dashboard runs --project moe-lightning --dry-run
    moe-lightning dashboard --project moe-lightning --entity my-team --filter "Config('config.routing') = 'topk'"

Only the argument parser loads with this module: wandb-workspaces, the run readers and Lightning (for the offline
check) load when the command runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SPEC_FILE = "wandb-dashboard.json"
# Summaries of this many of the project's newest runs give the keys when no local run is passed.
KEY_RUNS = 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lightning dashboard",
        description="Create or update a saved W&B workspace view of the geometry (loss; per-layer σ_max, decay "
        "slope and effective rank; PCA effective ranks; alignment and overlaps vs chance; router health; curvature; "
        "the spectra table with a step slider), built with wandb-workspaces from the keys the runs logged.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="local runs (run folders of moe-lightning fit, sweep jobs, CSV, TensorBoard or W&B offline directories, "
        "or folders holding them, searched recursively) whose keys the panels use; default: the summaries of the "
        "project's newest runs (needs the network)",
    )
    parser.add_argument("--project", required=True, help="W&B project")
    parser.add_argument("--entity", default=None, help="W&B entity (default: WANDB_ENTITY, else your default entity)")
    parser.add_argument(
        "--filter", default="", dest="filters", help="run filter, e.g. \"Config('config.routing') = 'topk'\""
    )
    parser.add_argument("--name", default="moe-lightning geometry", help="name of the saved view (and report title)")
    parser.add_argument("--url", default=None, help="URL of a saved view to update instead of creating a new one")
    parser.add_argument("--report", action="store_true", help="also save a W&B report with the same panels")
    parser.add_argument("--dry-run", action="store_true", help="print the spec as JSON; no network call")
    parser.add_argument(
        "--out",
        default=None,
        help=f"where the spec is written when it is not saved (default: <first RUN_DIR>/{SPEC_FILE}; none without "
        "RUN_DIR)",
    )
    return parser


def dashboard_spec(entity: str, project: str, keys: set[str], name: str, filters: str) -> dict[str, Any]:
    """The workspace, the report and the spectra chart's Vega-Lite spec as plain JSON data (no network)."""
    import pydantic

    from moe_lightning.report.workspace import (
        SPECTRA_CHART,
        SPECTRA_TABLE,
        geometry_report,
        geometry_workspace,
        spectra_chart_spec,
    )

    workspace = geometry_workspace(entity, project, keys, name=name, filters=filters)
    report = geometry_report(entity, project, keys, title=name, filters=filters)
    spec: dict[str, Any] = {
        "workspace": pydantic.TypeAdapter(type(workspace)).dump_python(workspace, mode="json"),
        "report": pydantic.TypeAdapter(type(report)).dump_python(report, mode="json"),
    }
    if SPECTRA_TABLE in keys:
        spec["spectra_chart"] = {"name": SPECTRA_CHART, "vega_lite": spectra_chart_spec()}
    return spec


def _local_keys(run_dirs: list[str]) -> set[str]:
    from moe_lightning.analysis.discover import discover_runs

    return {key for run in discover_runs(run_dirs) for key in run.keys}


def _project_keys(api: Any, entity: str, project: str) -> set[str]:
    """Every summary key of the project's newest runs (a run's summary holds each key it logged, media too)."""
    runs = api.runs(f"{entity}/{project}", order="-created_at", per_page=KEY_RUNS)
    keys: set[str] = set()
    for index, run in enumerate(runs):
        if index >= KEY_RUNS:
            break
        keys |= {k for k in run.summary.keys() if not k.startswith("_")}
    return keys


def _save(api: Any, args: argparse.Namespace, entity: str, keys: set[str]) -> list[str]:
    """Create the chart preset, save the workspace (and report); returns their URLs."""
    import wandb_workspaces.workspaces as ws

    from moe_lightning.report.workspace import (
        SPECTRA_CHART,
        SPECTRA_TABLE,
        geometry_report,
        geometry_workspace,
        spectra_chart_spec,
    )

    if SPECTRA_TABLE in keys:
        try:
            api.create_custom_chart(
                entity=entity,
                name=SPECTRA_CHART,
                display_name="moe-lightning spectra",
                spec_type="vega2",
                access="private",
                spec=spectra_chart_spec(),
            )
        except Exception as error:  # noqa: BLE001 - the preset exists from an earlier call: keep it
            if "exist" not in str(error).lower():
                raise
    workspace = geometry_workspace(entity, args.project, keys, name=args.name, filters=args.filters)
    if args.url:
        saved = ws.Workspace.from_url(args.url)
        saved.sections, saved.runset_settings = workspace.sections, workspace.runset_settings
        workspace = saved
    urls = [workspace.save().url]
    if args.report:
        report = geometry_report(entity, args.project, keys, title=args.name, filters=args.filters)
        report.save()
        urls.append(report.url)
    return urls


def _write(args: argparse.Namespace, spec: dict[str, Any], reason: str) -> None:
    """Keep the spec that could not be saved: in ``--out``, else next to the first run given, else nowhere."""
    path = args.out or (os.path.join(args.run_dirs[0], SPEC_FILE) if args.run_dirs else None)
    if path is None:
        print(f"moe-lightning dashboard: not saved to W&B ({reason}); pass --out FILE to keep the spec")
        return
    with open(path, "w") as handle:
        json.dump(spec, handle, indent=1)
    print(f"moe-lightning dashboard: not saved to W&B ({reason}); the spec is in {path}")


def main(argv: list[str]) -> int:
    """Entry point of ``moe-lightning dashboard``.

    Returns:
        0 when saved (or printed with ``--dry-run``); 1 without credentials or network (the spec is written to
        ``--out``, else into the first RUN_DIR); 2 for bad input.
    """
    args = _parser().parse_args(argv)
    from moe_lightning.lightning.loggers import resolve_wandb_offline

    entity = args.entity or os.environ.get("WANDB_ENTITY", "")
    try:
        keys = _local_keys(args.run_dirs) if args.run_dirs else set()
    except ValueError as error:
        print(f"moe-lightning: error: {error}", file=sys.stderr)
        return 2
    offline, reason = (True, "--dry-run") if args.dry_run else resolve_wandb_offline()
    if args.dry_run or offline:
        if not keys:
            print(
                "moe-lightning: error: no keys to build panels from: pass RUN_DIR (a local run)"
                + ("" if args.dry_run else f"; the project's runs cannot be read ({reason})"),
                file=sys.stderr,
            )
            return 2
        spec = dashboard_spec(entity, args.project, keys, args.name, args.filters)
        if args.dry_run:
            print(json.dumps(spec, indent=1))
            return 0
        _write(args, spec, reason)
        return 1
    import wandb

    try:
        api = wandb.Api(timeout=30)
        entity = entity or api.default_entity or ""
        keys = keys or _project_keys(api, entity, args.project)
        urls = _save(api, args, entity, keys)
    except Exception as error:  # noqa: BLE001 - a refused key or a dropped connection: keep the spec, say why
        _write(
            args,
            dashboard_spec(entity, args.project, keys, args.name, args.filters),
            f"{type(error).__name__}: {error}",
        )
        return 1
    for url in urls:
        print(url)
    return 0
