"""One folder per run: where ``moe-lightning fit`` writes everything of a run, and how a resume finds it again.

A run folder holds the LightningCLI ``config.yaml``, ``checkpoints/`` (with ``last.ckpt``), every logger's files
(W&B's ``wandb/``, CSV's ``metrics.csv``, TensorBoard's event files), the monitors' ``geometry/`` and
``curvature/`` reports, ``report/`` and, with W&B, the run's id (``wandb-run-id.txt``). Its default name is
``runs/<date>-<time>-<routing>`` (under ``--trainer.default_root_dir`` instead of ``runs`` when that is given);
``--run_dir`` names it. ``--ckpt_path`` to a checkpoint in a run folder (or
``--ckpt_path last`` with the folder's ``config.yaml``) continues that run: the same folder, the same W&B run id
and one history.

The folder is decided once, by the process the user started, and handed to the processes Lightning launches for
several devices through ``MOE_LIGHTNING_RUN_DIR``, so every rank writes to the same place.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import secrets
import string
import time
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_warn

from moe_lightning.analysis.discover import WANDB_ID_FILE

RUNS_ROOT = "runs"
RUN_DIR_ENV = "MOE_LIGHTNING_RUN_DIR"
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
# A logger's save_dir that leaves the place to the run folder: the default logger's, or none.
DEFAULT_SAVE_DIRS = (None, "", ".", RUNS_ROOT)
CSV_LOGGER, TENSORBOARD_LOGGER = "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
# Launchers that start every process themselves (torchrun, SLURM): a name they all agree on, from their job id.
LAUNCHER_IDS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def _class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _is(entry: Any, base: str) -> bool:
    """Whether a config entry (``Namespace(class_path=..., init_args=...)``) is a subclass of ``base``."""
    if not isinstance(entry, Namespace) or not isinstance(entry.get("class_path"), str):
        return False
    cls, parent = _class(entry.class_path), _class(base)
    return isinstance(cls, type) and isinstance(parent, type) and issubclass(cls, parent)


def _entries(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def run_label(config: Namespace) -> str:
    """What a run is, for its folder's name: the model's routing, else the model class's name."""
    routing = config.get("model.init_args.config.routing")
    if isinstance(routing, str):
        return routing
    class_path = config.get("model.class_path")
    return class_path.rsplit(".", 1)[-1].lower() if isinstance(class_path, str) else "run"


def new_run_dir(label: str, root: str = RUNS_ROOT) -> str:
    """A new, empty folder ``<root>/<date>-<time>-<label>``, with ``-2``, ``-3``, ... when that name is taken."""
    base = os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{label}")
    os.makedirs(root, exist_ok=True)
    for attempt in range(1, 1000):
        path = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.mkdir(path)  # fails when another run took the name first, so two runs never share a folder
        except FileExistsError:
            continue
        return path
    raise ValueError(f"run_dir: no free folder name under {root!r} for {base!r}; pass --run_dir")


def checkpoint_run_dir(ckpt_path: Any) -> str | None:
    """The run folder a checkpoint belongs to (``<folder>/checkpoints/<file>.ckpt`` next to ``<folder>/config.yaml``),
    or None."""
    if not isinstance(ckpt_path, str) or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    checkpoints = os.path.dirname(os.path.normpath(ckpt_path))
    if os.path.basename(checkpoints) != CHECKPOINTS:
        return None
    folder = os.path.dirname(checkpoints) or "."
    return folder if os.path.isfile(os.path.join(folder, CONFIG_FILE)) else None


def _launcher_name(label: str, root: str) -> str | None:
    """A folder name for processes started by an outside launcher (each process decides alone), or None."""
    ranked = "RANK" in os.environ or "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not ranked:
        return None
    for variable in LAUNCHER_IDS:
        value = os.environ.get(variable, "")
        if value and value != "none":
            return os.path.join(root, f"{label}-{variable.split('_')[0].lower()}{value}")
    raise ValueError(
        "run_dir: several processes were started by an outside launcher without a job id they share "
        f"({' or '.join(LAUNCHER_IDS)}); pass --run_dir so that every process writes to the same run folder"
    )


def resolve_run_dir(config: Namespace, subcommand: str | None) -> tuple[str, bool]:
    """``(run folder, whether this fit continues the run in it)``, the folder created.

    Raises:
        ValueError: a fresh fit into a folder that already holds a run, ``--ckpt_path last`` without a
            ``last.ckpt`` in the folder, or an outside launcher without a shared name.
    """
    ckpt_path = config.get("ckpt_path")
    fit = subcommand in (None, "fit")
    resuming = fit and ckpt_path is not None
    if os.environ.get(RUN_DIR_ENV):  # a process Lightning launched: the folder its parent decided
        return os.environ[RUN_DIR_ENV], resuming
    home, root = _first_logger_place(config)
    # A checkpoint inside a run folder names its run; else the folder given (a run's saved config names its own).
    given = checkpoint_run_dir(ckpt_path) or config.get("run_dir") or home
    root = root or config.get("trainer.default_root_dir") or RUNS_ROOT
    if not fit:  # an evaluation goes into a new folder, inside the run's folder when it has one
        label = subcommand if given else f"{run_label(config)}-{subcommand}"
        return new_run_dir(label, given or root), False
    if given is None:
        label = run_label(config)
        launched = _launcher_name(label, root)
        if launched is not None:
            os.makedirs(launched, exist_ok=True)
            return launched, resuming
        return new_run_dir(label, root), resuming
    if resuming and ckpt_path == "last" and not os.path.isfile(os.path.join(given, CHECKPOINTS, "last.ckpt")):
        raise ValueError(f"ckpt_path: 'last' continues a run, but {given!r} holds no {CHECKPOINTS}/last.ckpt")
    if not resuming and os.path.isfile(os.path.join(given, CONFIG_FILE)):
        raise ValueError(
            f"run_dir: {given!r} holds a run already; continue it with --ckpt_path last (or a checkpoint of its "
            f"{CHECKPOINTS}/), or choose another --run_dir"
        )
    os.makedirs(given, exist_ok=True)
    return given, resuming


def _wandb_id(run_dir: str, given: Any) -> str:
    """The run's W&B id: the one given, else the one stored in the folder, else a new one; stored in the folder."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if not isinstance(given, str) or not given:
        try:
            with open(path) as handle:
                given = handle.read().strip()
        except FileNotFoundError:
            given = ""
    if not given:
        # W&B's own run ids: 8 characters of [a-z0-9].
        given = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open(path, "w") as handle:
        handle.write(given + "\n")
    return given


def _loggers(config: Namespace) -> list[Namespace]:
    logger = config.get("trainer.logger")
    return [entry for entry in _entries(logger) if isinstance(entry, Namespace) and "init_args" in entry]


def _placed(entry: Namespace) -> str | None:
    """A logger's ``save_dir`` when the config chose one, else None."""
    save_dir = entry.init_args.get("save_dir")
    return None if save_dir in DEFAULT_SAVE_DIRS else str(save_dir)


def _first_logger_place(config: Namespace) -> tuple[str | None, str | None]:
    """``(run folder, parent of run folders)`` after the first logger's ``save_dir``, when the config chose one: a
    CSV or TensorBoard logger without name and version writes into it, which is then the run folder (the sweep's
    jobs do that); any other chosen ``save_dir`` is where the run's folder is made."""
    loggers = _loggers(config)
    save_dir = _placed(loggers[0]) if loggers else None
    if save_dir is None:
        return None, None
    first = loggers[0].init_args
    if (_is(loggers[0], CSV_LOGGER) or _is(loggers[0], TENSORBOARD_LOGGER)) and first.get("name") == first.get(
        "version"
    ) == "":
        return save_dir, None
    return None, save_dir


def wandb_installed() -> bool:
    """Whether ``import wandb`` would find the package (looked up, not imported: importing it takes seconds)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def check_wandb_loggers(config: Namespace) -> None:
    """Without wandb, a W&B logger in the config fails with what to do, rather than with jsonargparse's complaint
    about one of its options; the default logger, CSV then, says so once.

    Raises:
        ValueError: the config names a W&B logger and wandb is not installed.
    """
    if wandb_installed():
        return
    for entry in _loggers(config):
        if _is(entry, WANDB_LOGGER):
            raise ValueError(
                f"trainer.logger: {entry.class_path} needs wandb, which is not installed; install it "
                "(pip install wandb) or choose another logger, e.g. --trainer.logger=CSVLogger"
            )
    first = _loggers(config)[:1]
    if first and _is(first[0], CSV_LOGGER) and first[0].init_args.get("save_dir") == RUNS_ROOT:
        rank_zero_warn("wandb is not installed: the run logs to CSV (metrics.csv in the run folder)")


def place_loggers(config: Namespace, run_dir: str) -> None:
    """The loggers write into ``run_dir``: CSV and TensorBoard directly (``save_dir`` the folder, no name or
    version subfolders), W&B under ``wandb/`` with the folder's run id, resumed when the run is continued. The
    first logger always; another one unless the config chose its ``save_dir``."""
    for index, entry in enumerate(_loggers(config)):
        if index and _placed(entry) is not None:
            continue
        if _is(entry, CSV_LOGGER) or _is(entry, TENSORBOARD_LOGGER):
            entry.init_args.save_dir, entry.init_args.name, entry.init_args.version = run_dir, "", ""
        elif _is(entry, WANDB_LOGGER):
            args = entry.init_args
            args.save_dir, args.dir = run_dir, None
            args.id = _wandb_id(run_dir, args.get("id") or args.get("version"))
            args.version = None
            args.resume = args.get("resume") or "allow"
            args.name = args.get("name") or os.path.basename(os.path.normpath(run_dir))


def place_checkpoints(config: Namespace, run_dir: str) -> None:
    """Checkpoints go to ``<run_dir>/checkpoints/`` with a ``last.ckpt``: a ModelCheckpoint of the config without a
    ``dirpath`` gets that folder (and ``save_last`` unless set); without any, one is added."""
    trainer = config.trainer
    if trainer.get("enable_checkpointing") is False:
        return
    dirpath = os.path.join(run_dir, CHECKPOINTS)
    callbacks = list(trainer.get("callbacks") or [])
    checkpoints = [entry for entry in callbacks if _is(entry, "lightning.pytorch.callbacks.ModelCheckpoint")]
    for entry in checkpoints:
        if entry.init_args.get("dirpath") is None:
            entry.init_args.dirpath = dirpath
        if entry.init_args.get("save_last") is None:
            entry.init_args.save_last = True
    if not checkpoints:
        init_args = Namespace(dirpath=dirpath, save_last=True)
        callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=init_args))
    trainer.callbacks = callbacks


def discard_if_empty(run_dir: str | None) -> None:
    """Remove the folder of a run that failed before writing anything but its W&B id, so no empty run is left."""
    if run_dir is None or not os.path.isdir(run_dir):
        return
    if set(os.listdir(run_dir)) <= {WANDB_ID_FILE}:
        for name in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)
