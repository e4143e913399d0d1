"""What the page of one run says before its charts: the run's settings (model, optimiser, data, length, seed), its
wall time, each MoE layer's geometry at the first and the last probe, and which logged series never change."""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd

from moe_lightning.analysis.run import Run, layer_names, read_yaml

# (column title, metric key under geometry/<layer>/): the quantities a first look needs.
GEOMETRY_COLUMNS = (
    ("sigma_max", "jac_sigma_max/mean"),
    ("jac_eff_rank", "jac_effective_rank/mean"),
    ("pca_eff_rank", "pca_hidden_effective_rank/mean"),
    ("align/chance", "align_ratio"),
)
ROUTER_COLUMN = ("load_cv", "load_cv")


def _value_near(series: pd.Series, step: int) -> float:
    """The value logged at ``step`` or the last one before it; the first one after when none came before."""
    logged = series.dropna()
    if not len(logged):
        return math.nan
    before = logged[logged.index <= step]
    return float(before.iloc[-1] if len(before) else logged.iloc[0])


def first_last(history: pd.DataFrame) -> list[dict[str, object]]:
    """One row per probed layer and probe (the first and the last), with the ``GEOMETRY_COLUMNS`` and the router's
    load coefficient of variation at the nearest logged step (NaN: not logged)."""
    rows: list[dict[str, object]] = []
    for layer in layer_names(history):
        probed = history[f"geometry/{layer}/tokens_total"].dropna().index
        for step in dict.fromkeys((int(probed[0]), int(probed[-1]))):
            row: dict[str, object] = {"layer": layer, "step": step}
            for title, key in GEOMETRY_COLUMNS:
                column = f"geometry/{layer}/{key}"
                row[title] = float(history.at[step, column]) if column in history.columns else math.nan
            router = f"router/{layer}/{ROUTER_COLUMN[1]}"
            row[ROUTER_COLUMN[0]] = _value_near(history[router], step) if router in history.columns else math.nan
            rows.append(row)
    return rows


def constant_value(*series: pd.Series | None) -> float | None:
    """The first series' value when every given series (a quantity and its experts) was logged at two steps or more
    and never changed, e.g. ``tokens_total``, the probe set's size; None otherwise (a single probe says nothing
    about change)."""
    logged = [s.dropna() for s in series if s is not None]
    if not logged or not len(logged[0]) or max(len(s.index.unique()) for s in logged) < 2:
        return None
    return float(logged[0].iloc[0]) if all(s.nunique(dropna=True) <= 1 for s in logged) else None


def _model_config(run: Run, cli: dict[str, Any]) -> dict[str, Any]:
    config = run.config.get("config")
    if isinstance(config, dict):
        return config
    model = cli.get("model") or {}
    init_args = model.get("init_args") or {} if isinstance(model, dict) else {}
    config = init_args.get("config") if isinstance(init_args, dict) else None
    return config if isinstance(config, dict) else {}


def _setting(run: Run, cli: dict[str, Any], section: str, key: str) -> Any:
    """``key`` from the hyperparameters the run recorded, else from its LightningCLI config's ``section``."""
    if key in run.config:
        return run.config[key]
    part = cli.get(section) or {}
    init_args = part.get("init_args") or {} if isinstance(part, dict) else {}
    return init_args.get(key) if isinstance(init_args, dict) else None


def _experts(routing: str | None, model: dict[str, Any]) -> tuple[Any, Any]:
    """``(experts, experts per token)`` as the routing uses them."""
    experts, top_k = model.get("num_experts"), model.get("top_k")
    if routing is not None and routing.startswith("dense"):  # dense, or a sweep's dense_total / dense_active arm
        return "1 (dense FFN)", "1"
    if routing == "soft":
        return experts, f"all {experts} (soft: gate-weighted)" if experts is not None else "all (soft)"
    return experts, top_k


def run_settings(run: Run) -> dict[str, Any]:
    """The settings a reader of the run's page needs first, by label (None: the run's files do not say).

    Read from the hyperparameters the run recorded (the W&B config, ``hparams.yaml``) and, for what those lack
    (the trainer's step budget), from the LightningCLI ``config.yaml`` in the run's own folder (never from a
    folder above it, where another run's config may lie). ``last logged step`` is the last step of its history.
    """
    cli = read_yaml(os.path.join(run.path, "config.yaml"))
    model = _model_config(run, cli)
    trainer = cli.get("trainer") if isinstance(cli.get("trainer"), dict) else {}
    experts, per_token = _experts(run.routing, model)
    width = model.get("dim")
    hidden = model.get("expert_hidden")
    steps = int(run.history.index.max()) if run.history is not None and len(run.history.index) else None
    return {
        "routing": run.routing,
        "model": run.family,
        "experts": experts,
        "experts per token (k)": per_token,
        "MoE blocks": model.get("num_blocks"),
        "width / expert hidden": f"{width} / {hidden}" if width is not None or hidden is not None else None,
        "learning rate": _setting(run, cli, "model", "lr"),
        "lr schedule": _setting(run, cli, "model", "lr_schedule"),
        "warm-up steps": _setting(run, cli, "model", "warmup_steps"),
        "batch size": _setting(run, cli, "data", "batch_size"),
        "seed": run.seed,
        "last logged step": steps,
        "max_steps / max_epochs": (f"{trainer.get('max_steps')} / {trainer.get('max_epochs')}" if trainer else None),
        "wall time": run.wall_s,
    }
