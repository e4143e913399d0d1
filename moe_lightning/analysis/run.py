"""One training run as the analysis sees it (:class:`Run`), the arms the claims compare, how a run's routing, seed
and family are read from the config files next to its log, and what its history and saved probes hold.

The loaders of each log layout fill a :class:`Run`: :mod:`moe_lightning.analysis.log_dirs` (CSV and TensorBoard),
:mod:`moe_lightning.analysis.wandb_runs` (W&B) and :mod:`moe_lightning.analysis.discover` (sweep jobs, and the walk
that finds them all).
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from moe_lightning.common.choices import ROUTINGS

DATA_SEED_NOTE = "seed taken from the data module's `seed`"
# The arms the claims compare. A dense run is the control of equal total parameters (hidden E·H) or of equal active
# FLOPs (hidden k·H), after its ``capacity_match``; runs written before both controls existed say ``dense`` with
# ``capacity_match: total`` (MoEConfig's default), so they are ``dense_total``.
CONTROLS = ("dense_total", "dense_active")
ARMS = ("topk", "soft", *CONTROLS)
_ARM_ORDER = (*CONTROLS, "dense", "topk", "soft")


def arm_order(arm: str | None) -> int:
    """The position of an arm in tables and figures: the controls first, then top-k, soft, then variants."""
    return _ARM_ORDER.index(arm) if arm in _ARM_ORDER else len(_ARM_ORDER)


_FAMILIES = {"MLPMoEModule": "mlp", "CausalLMModule": "transformer"}


@dataclass
class Run:
    """One training run found by :func:`discover_runs`.

    Attributes:
        path: the run directory (the sweep job directory, the CSV log directory or the W&B run directory).
        source: ``"csv"``, ``"tensorboard"`` or ``"wandb"``: where the scalar history was read from (``"none"``
            when it could not be).
        routing: ``"dense"``, ``"topk"``, ``"soft"``, a sweep variant's name, or None when unknown.
        seed: the run's seed, or None when unknown.
        family: ``"mlp"``, ``"transformer"`` or None.
        status: ``"done"``, or why the run is left out of the statistics (``"failed"``, ``"running"``, ...).
        preset: the sweep preset, when the run belongs to a sweep.
        history: scalar history, one row per trainer step (index ``step``), one column per metric key.
        media_keys: the keys of the run's media (tables, histograms, images), where its log keeps them (W&B).
        geometry_dir: the directory holding ``step_<7 digits>.json`` geometry reports, when there is one.
        note: a short explanation shown in the report (e.g. the return code of a failed job).
        capacity_match: a dense run's ``capacity_match`` (``"total"`` or ``"active"``), when its config says.
        config: the hyperparameters the run recorded (the W&B config, else ``hparams.yaml``).
        wall_s: the run's wall time in seconds, where its log records one (a sweep job's ``run.json``, the W&B
            runtime); None otherwise.
    """

    path: str
    source: str
    routing: str | None = None
    seed: int | None = None
    family: str | None = None
    status: str = "done"
    preset: str | None = None
    history: pd.DataFrame | None = None
    geometry_dir: str | None = None
    note: str = ""
    capacity_match: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    media_keys: set[str] = field(default_factory=set, repr=False)
    wall_s: float | None = None

    @property
    def arm(self) -> str | None:
        """The arm this run belongs to: its routing, except that a ``dense`` run is ``dense_total`` or
        ``dense_active`` after its ``capacity_match`` (``total`` when the config does not say)."""
        if self.routing == "dense":
            return f"dense_{self.capacity_match or 'total'}"
        return self.routing

    @property
    def ok(self) -> bool:
        """Whether the run enters the statistics: finished, with a known routing and a history."""
        return self.status == "done" and self.routing is not None and self.history is not None

    @property
    def keys(self) -> set[str]:
        """Every key the run logged: the scalar history's columns and the media keys."""
        scalars = set() if self.history is None else {str(c) for c in self.history.columns}
        return scalars | self.media_keys

    @property
    def label(self) -> str:
        """``"<routing> seed <k>"`` for messages."""
        return f"{self.routing or '?'} seed {self.seed if self.seed is not None else '?'}"


# ---------------------------------------------------------------------------------------------------------------
# Routing, seed and family from the config files
# ---------------------------------------------------------------------------------------------------------------


def seed_value(value: Any) -> int | None:
    """A config value as a seed: an int, or None for a missing, boolean or non-numeric value."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def family_from_hparams(hparams: dict[str, Any]) -> str | None:
    """``"transformer"`` or ``"mlp"`` after the fields of a model config (``hparams["config"]``), else None."""
    config = hparams.get("config")
    if not isinstance(config, dict):
        return None
    if "vocab_size" in config:
        return "transformer"
    if "input_dim" in config:
        return "mlp"
    return None


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping, or ``{}`` when the file is missing, unreadable or not a mapping."""
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def capacity_match_of(model_config: Any) -> str | None:
    """A model config's ``capacity_match``, when it says."""
    value = model_config.get("capacity_match") if isinstance(model_config, dict) else None
    return str(value) if value is not None else None


def _describe_from_cli_config(
    config: dict[str, Any],
) -> tuple[str | None, int | None, str | None, str | None]:
    """Routing, seed, family and capacity_match from a LightningCLI ``config.yaml``."""
    model = config.get("model") or {}
    init_args = model.get("init_args") or {} if isinstance(model, dict) else {}
    model_config = init_args.get("config") or {} if isinstance(init_args, dict) else {}
    routing = model_config.get("routing") if isinstance(model_config, dict) else None
    class_path = model.get("class_path", "") if isinstance(model, dict) else ""
    family = _FAMILIES.get(str(class_path).rsplit(".", 1)[-1])
    return routing, seed_value(config.get("seed_everything")), family, capacity_match_of(model_config)


def _apply_description(run: Run, directory: str) -> None:
    """Fill routing/seed/family from ``config.yaml`` (LightningCLI), falling back to ``hparams.yaml``."""
    routing, seed, family, capacity = _describe_from_cli_config(read_yaml(os.path.join(directory, "config.yaml")))
    hparams = read_yaml(os.path.join(directory, "hparams.yaml"))
    run.config = run.config or hparams
    run.capacity_match = run.capacity_match or capacity or capacity_match_of(hparams.get("config"))
    if routing is None and isinstance(hparams.get("config"), dict):
        routing = hparams["config"].get("routing")
    if seed is None:
        seed = seed_value(hparams.get("seed_everything", hparams.get("seed")))
    run.routing = run.routing or routing
    run.seed = run.seed if run.seed is not None else seed
    run.family = run.family or family or family_from_hparams(hparams)


def check_routing(run: Run, variant: bool = False) -> None:
    """A run needs a known routing; a sweep variant's (``run.json`` says ``variant``) is its name."""
    if run.routing is not None and run.routing not in ROUTINGS + CONTROLS and not variant:
        run.note = f"unknown routing {run.routing!r} (allowed: {', '.join(ROUTINGS + CONTROLS)})"
        run.status = "unknown routing"
    elif run.routing is None and run.status == "done":
        run.status = "unknown routing"
        run.note = "no routing found in run.json, config.yaml, hparams.yaml or the W&B config"


def describe_log_directory(run: Run, directory: str) -> Run:
    """Routing, seed, family and ``geometry/`` of a CSV or TensorBoard log directory."""
    _apply_description(run, directory)
    geometry = os.path.join(directory, "geometry")
    run.geometry_dir = geometry if os.path.isdir(geometry) else None
    check_routing(run)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------


def layer_names(history: pd.DataFrame) -> list[str]:
    """The probed layers of a run, in order of first appearance (from ``geometry/<layer>/tokens_total``)."""
    names = []
    for column in history.columns:
        parts = str(column).split("/")
        if len(parts) == 3 and parts[0] == "geometry" and parts[2] == "tokens_total":
            names.append(parts[1])
    return names


def last_probe_step(history: pd.DataFrame, layer: str) -> int | None:
    """The last step at which ``layer`` was probed (its ``tokens_total`` key is logged with every probe)."""
    column = f"geometry/{layer}/tokens_total"
    if column not in history.columns:
        return None
    logged = history[column].dropna()
    return int(logged.index[-1]) if len(logged) else None


def final_value(history: pd.DataFrame, key: str, step: int | None = None) -> float:
    """``key`` at ``step`` (NaN when not logged there); with ``step=None`` its last logged value (NaN if never)."""
    if key not in history.columns:
        return math.nan
    if step is not None:
        return float(history.at[step, key]) if step in history.index else math.nan
    logged = history[key].dropna()
    return float(logged.iloc[-1]) if len(logged) else math.nan


def geometry_steps(geometry_dir: str | None) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``step_<7 digits>.json`` in ``geometry_dir``, by step."""
    if geometry_dir is None:
        return []
    found = []
    for path in glob.glob(os.path.join(geometry_dir, "step_*.json")):
        stem = os.path.basename(path)[len("step_") : -len(".json")]
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def load_geometry(path: str) -> tuple[int, dict[str, Any]]:
    """One geometry JSON file as ``(step, {layer: GeometryReport})``."""
    # The figures and the dashboard want tensors; the tables read the JSON themselves, without torch.
    from moe_lightning.geometry import GeometryReport

    with open(path) as handle:
        payload = json.load(handle)
    layers = {name: GeometryReport.from_dict(data) for name, data in payload.get("layers", {}).items()}
    return int(payload.get("step", -1)), layers


def final_geometry(run: Run) -> tuple[int, dict[str, Any]] | None:
    """The run's last geometry report file, or None when it has none (or it cannot be read)."""
    steps = geometry_steps(run.geometry_dir)
    for _step, path in reversed(steps):
        try:
            return load_geometry(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file: fall back to the one before
    return None
