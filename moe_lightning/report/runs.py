"""Find training runs under a directory and load their scalar history, routing, seed and geometry reports.

Four layouts are understood (see ``docs/sweeps.md``):

1. a sweep job directory ``<sweep>/<routing>-seed<k>/`` with ``run.json`` (written by ``moe-lightning sweep``),
   plus ``metrics.csv`` or a ``wandb/`` run;
2. a plain CSV run directory: any directory holding ``metrics.csv`` (Lightning's ``CSVLogger``); routing and seed
   come from the LightningCLI ``config.yaml`` next to it, else from ``hparams.yaml``;
3. a TensorBoard log directory (``TensorBoardLogger``'s ``<save_dir>/<name>/version_<n>/`` with
   ``events.out.tfevents.*``); the scalars are read with TensorBoard's own event reader, routing and seed as for CSV;
4. a W&B run directory (``.../wandb/offline-run-<time>-<id>/`` with ``run-<id>.wandb``); the history and the
   config are read from the ``.wandb`` transaction log (:mod:`moe_lightning.report.wandb_records`).

A directory that holds ``metrics.csv`` is read from the CSV only, never also from a W&B run below it.
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
from moe_lightning.report.wandb_records import read_wandb_run

_DATA_SEED_NOTE = "seed taken from the data module's `seed`"
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
# Discovery
# ---------------------------------------------------------------------------------------------------------------


def _wandb_file(directory: str) -> str | None:
    files = sorted(glob.glob(os.path.join(directory, "run-*.wandb")))
    return files[-1] if files else None


def _tensorboard_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))


def discover_runs(directories: list[str]) -> list[Run]:
    """Find every run under the given directories (recursively) and load it.

    Args:
        directories: run directories or directories containing runs, at any depth.

    Returns:
        The runs, in path order; runs that could not be read have a ``status`` other than ``"done"``.

    Raises:
        ValueError: a directory does not exist or contains no run, or two finished runs share routing, family and
            seed (they would be counted twice).
    """
    runs: list[Run] = []
    for root in directories:
        if not os.path.isdir(root):
            raise ValueError(f"{root!r} is not a directory; expected a run directory or a directory containing runs")
        found: list[Run] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "run.json" in filenames:
                found.append(load_sweep_job(dirpath))
            elif "metrics.csv" in filenames:
                found.append(load_csv_run(dirpath))
            elif _tensorboard_files(dirpath):
                found.append(load_tensorboard_run(dirpath))
            elif _wandb_file(dirpath) is not None:
                found.append(load_wandb_run(dirpath))
            else:
                continue
            dirnames[:] = []  # a run's own subdirectories (geometry/, wandb/) hold no further runs
        if not found:
            raise ValueError(
                f"no runs found in {root!r}: expected, at any depth, a sweep job directory with run.json, a "
                "directory with metrics.csv (CSVLogger), a TensorBoard log directory with events.out.tfevents.*, or "
                "a W&B run directory with run-<id>.wandb"
            )
        runs.extend(found)
    seen: dict[tuple[str | None, str | None, int], str] = {}
    for run in runs:
        if not run.ok or run.seed is None:
            continue
        key = (run.family, run.arm, run.seed)
        if key in seen:
            what = f"routing={run.routing!r}" if run.arm == run.routing else f"arm={run.arm!r}"
            raise ValueError(
                f"two runs with {what} and seed={run.seed}: {seen[key]!r} and {run.path!r}; "
                "pass directories that hold each (routing, seed) once"
            )
        seen[key] = run.path
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def read_metrics_csv(path: str) -> pd.DataFrame:
    """Lightning ``metrics.csv`` as one row per step (the last non-null value of each column at that step)."""
    frame = pd.read_csv(path)
    if "step" not in frame.columns:
        raise ValueError(f"{path!r} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
    frame = frame.dropna(subset=["step"])
    frame["step"] = frame["step"].astype(int)
    return frame.groupby("step").last().sort_index()


def _seed_value(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _family_from_hparams(hparams: dict[str, Any]) -> str | None:
    config = hparams.get("config")
    if not isinstance(config, dict):
        return None
    if "vocab_size" in config:
        return "transformer"
    if "input_dim" in config:
        return "mlp"
    return None


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _capacity_match(model_config: Any) -> str | None:
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
    return routing, _seed_value(config.get("seed_everything")), family, _capacity_match(model_config)


def _apply_description(run: Run, directory: str) -> None:
    """Fill routing/seed/family from ``config.yaml`` (LightningCLI), falling back to ``hparams.yaml``."""
    routing, seed, family, capacity = _describe_from_cli_config(_read_yaml(os.path.join(directory, "config.yaml")))
    hparams = _read_yaml(os.path.join(directory, "hparams.yaml"))
    run.capacity_match = run.capacity_match or capacity or _capacity_match(hparams.get("config"))
    if routing is None and isinstance(hparams.get("config"), dict):
        routing = hparams["config"].get("routing")
    if seed is None:
        seed = _seed_value(hparams.get("seed_everything", hparams.get("seed")))
    run.routing = run.routing or routing
    run.seed = run.seed if run.seed is not None else seed
    run.family = run.family or family or _family_from_hparams(hparams)


def _check_routing(run: Run, variant: bool = False) -> None:
    """A run needs a known routing; a sweep variant's (``run.json`` says ``variant``) is its name."""
    if run.routing is not None and run.routing not in ROUTINGS + CONTROLS and not variant:
        run.note = f"unknown routing {run.routing!r} (allowed: {', '.join(ROUTINGS + CONTROLS)})"
        run.status = "unknown routing"
    elif run.routing is None and run.status == "done":
        run.status = "unknown routing"
        run.note = "no routing found in run.json, config.yaml, hparams.yaml or the W&B config"


def load_csv_run(directory: str) -> Run:
    """A directory with ``metrics.csv`` (and ``config.yaml``/``hparams.yaml``, ``geometry/``)."""
    run = Run(path=directory, source="csv")
    try:
        run.history = read_metrics_csv(os.path.join(directory, "metrics.csv"))
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        run.status, run.note, run.source = "unreadable", f"metrics.csv: {error}", "none"
    return _describe_log_directory(run, directory)


def _describe_log_directory(run: Run, directory: str) -> Run:
    """Routing, seed, family and ``geometry/`` of a CSV or TensorBoard log directory."""
    _apply_description(run, directory)
    geometry = os.path.join(directory, "geometry")
    run.geometry_dir = geometry if os.path.isdir(geometry) else None
    _check_routing(run)
    return run


def read_tensorboard_scalars(directory: str) -> pd.DataFrame:
    """Every scalar of the TensorBoard event files in ``directory`` as one row per step (the last value written at a
    step wins), read with TensorBoard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    columns: dict[str, dict[int, float]] = {}
    for path in _tensorboard_files(directory):
        events = EventAccumulator(path, size_guidance={SCALARS: 0})  # 0: keep every event, not a sample
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            column = columns.setdefault(tag, {})
            for event in events.Scalars(tag):
                column[int(event.step)] = float(event.value)
    frame = pd.DataFrame(columns)
    frame.index = frame.index.astype(int)
    frame.index.name = "step"
    return frame.sort_index()


def load_tensorboard_run(directory: str) -> Run:
    """A ``TensorBoardLogger`` log directory (``events.out.tfevents.*``, ``hparams.yaml``, ``geometry/``)."""
    run = Run(path=directory, source="tensorboard")
    try:
        run.history = read_tensorboard_scalars(directory)
    except Exception as error:  # noqa: BLE001 - a corrupt event file: the run is listed as unreadable
        run.status, run.note, run.source = "unreadable", f"TensorBoard events: {error}", "none"
    return _describe_log_directory(run, directory)


def _seed_from_args(args: list[str]) -> int | None:
    """``--seed_everything=N`` or ``--seed_everything N`` on the recorded command line."""
    for index, arg in enumerate(args):
        if arg.startswith("--seed_everything="):
            return _seed_value(arg.split("=", 1)[1])
        if arg == "--seed_everything" and index + 1 < len(args):
            return _seed_value(args[index + 1])
    return None


def load_wandb_run(directory: str) -> Run:
    """A W&B run directory (``run-<id>.wandb`` and ``files/``)."""
    run = Run(path=directory, source="wandb")
    path = _wandb_file(directory)
    assert path is not None
    try:
        content = read_wandb_run(path)
    except (ValueError, OSError) as error:
        run.status, run.note, run.source = "unreadable", f"{os.path.basename(path)}: {error}", "none"
        return run
    run.history, run.config, run.media_keys = content.history, content.config, content.media_keys
    if content.exit_code is None:
        run.status, run.note = "incomplete", "the W&B log has no exit record (still running, or killed)"
    elif content.exit_code != 0:
        run.status, run.note = "failed", f"exit code {content.exit_code}"
    config = content.config
    files_config = _read_yaml(os.path.join(directory, "files", "config.yaml"))
    for key, value in files_config.items():  # W&B's own files/config.yaml: {key: {"value": ...}}
        if isinstance(value, dict) and "value" in value:
            config.setdefault(key, value["value"])
    if isinstance(config.get("config"), dict):
        run.routing = config["config"].get("routing")
        run.capacity_match = _capacity_match(config["config"])
    run.seed = _seed_value(config.get("seed_everything"))
    if run.seed is None:
        run.seed = _seed_from_args(content.args)
    if run.seed is None and _seed_value(config.get("seed")) is not None:
        # The W&B config holds the LightningModule's and DataModule's hyperparameters, not seed_everything.
        run.seed = _seed_value(config.get("seed"))
        run.note = "; ".join(
            filter(None, [run.note, f"{_DATA_SEED_NOTE} (no seed_everything in the W&B config or command line)"])
        )
    run.family = _family_from_hparams(config)
    geometry = os.path.join(directory, "files", "geometry")
    run.geometry_dir = geometry if os.path.isdir(geometry) else None
    _check_routing(run)
    return run


def load_sweep_job(directory: str) -> Run:
    """A sweep job directory: ``run.json`` plus ``metrics.csv`` or a ``wandb/`` run below it."""
    try:
        with open(os.path.join(directory, "run.json")) as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return Run(path=directory, source="none", status="unreadable", note=f"run.json: {error}")
    if os.path.isfile(os.path.join(directory, "metrics.csv")):
        run = load_csv_run(directory)
    else:
        wandb_dirs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(directory, "wandb", "*", "run-*.wandb")))
        if wandb_dirs:
            run = load_wandb_run(wandb_dirs[-1])
            run.path = directory
        else:
            run = Run(path=directory, source="none", status="no metrics", note="no metrics.csv and no W&B run")
    run.routing = meta.get("routing") or run.routing
    seed = _seed_value(meta.get("seed"))
    if seed is not None:
        run.seed = seed
        run.note = "; ".join(part for part in run.note.split("; ") if part and not part.startswith(_DATA_SEED_NOTE))
    run.family = meta.get("family") or run.family
    run.preset = meta.get("preset")
    status = meta.get("status", "unknown")
    if status != "done":
        run.status = str(status)
        returncode = meta.get("returncode")
        run.note = f"sweep status {status!r}" + (f", return code {returncode}" if returncode is not None else "")
    elif run.status == "unknown routing":
        run.status, run.note = "done", ""
    _check_routing(run, variant=bool(meta.get("variant")))
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
