"""``moe-lightning fit | validate | test | predict``: LightningCLI with moe-lightning's defaults. Lightning loads
with this module, so the dispatcher in :mod:`moe_lightning.commands` imports it only when one of these commands runs.

Examples:
    moe-lightning fit --config configs/mlp/topk.yaml --config configs/trainer/cpu.yaml
    moe-lightning fit --config configs/mlp/soft.yaml --trainer.logger=CSVLogger
    moe-lightning fit --config runs/<run>/config.yaml --ckpt_path last --trainer.max_epochs=32   # continue a run
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.commands.checkpoint import check_checkpoint
from moe_lightning.commands.config_errors import describe_parse_error
from moe_lightning.commands.run_folder import (
    RUN_DIR_ENV,
    RUNS_ROOT,
    check_wandb_loggers,
    discard_if_empty,
    place_checkpoints,
    place_loggers,
    resolve_run_dir,
    wandb_installed,
)
from moe_lightning.lightning.loggers import CSVHistoryMark, continue_csv_log, finish_wandb_runs

DEFAULT_LOGGER = {"class_path": "moe_lightning.lightning.loggers.AutoWandbLogger", "init_args": {"save_dir": "runs"}}
# Without wandb (an image that ships only torch and Lightning, say) a run logs to metrics.csv rather than failing.
FALLBACK_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}


class ConfigError(ValueError):
    """A command line or config that cannot run; its message is the one line the user sees."""


class MoELightningCLI(LightningCLI):
    """LightningCLI with moe-lightning's defaults: any LightningModule / DataModule by ``class_path``, the W&B
    logger (offline when needed; CSV when wandb is not installed) unless another is chosen, and one folder per run
    (:mod:`moe_lightning.commands.run_folder`) holding its config, checkpoints, logs, reports and report."""

    run_dir: str | None = None
    _decided_run_dir = False
    _resuming = False

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER if wandb_installed() else FALLBACK_LOGGER})
        # jsonargparse raises instead of printing every option's usage: parse_arguments turns it into one line.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        try:
            super().__init__(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=args,
                **kwargs,
            )
        except BaseException:
            if self._decided_run_dir:
                discard_if_empty(self.run_dir)
            raise
        finally:
            # The folder is handed to the processes this run launches, not to a later run of the same interpreter.
            if self.run_dir is not None and self._decided_run_dir and os.environ.get(RUN_DIR_ENV) == self.run_dir:
                del os.environ[RUN_DIR_ENV]

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--summary",
            type=bool,
            default=True,
            help="After fit, print each MoE layer's geometry at the first and the last probe and write the run's "
            "local report (needs GeometryMonitor among the callbacks).",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="The run's folder: its config, checkpoints (with last.ckpt), logs, geometry reports and report. "
            f"Default: a new <root>/<date>-<time>-<routing>, <root> being --trainer.default_root_dir or {RUNS_ROOT}; "
            "with --ckpt_path in a run folder, that folder, and fit continues the run (the same W&B run). validate, "
            "test and predict write into a new folder inside the run's.",
        )

    def before_instantiate_classes(self) -> None:
        """Decide the run's folder and point the loggers and checkpoints at it (recorded in the saved config)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._decided_run_dir = not os.environ.get(RUN_DIR_ENV)
        self.run_dir, self._resuming = resolve_run_dir(config, self.subcommand)
        os.environ[RUN_DIR_ENV] = self.run_dir
        config.run_dir = self.run_dir
        check_wandb_loggers(config)
        place_loggers(config, self.run_dir)
        place_checkpoints(config, self.run_dir)
        if rank_zero_only.rank == 0:
            print(f"Run folder: {self.run_dir}" + (" (continued)" if self._resuming else ""), flush=True)

    def instantiate_trainer(self, **kwargs):
        """The trainer, rooted in the run folder (what Lightning writes without a logger goes there too), its CSV
        history kept in step with its checkpoints (:class:`CSVHistoryMark`), so a resumed run has one history."""
        trainer = super().instantiate_trainer(**{"default_root_dir": self.run_dir, **kwargs})
        trainer.callbacks.append(CSVHistoryMark(trainer.loggers))
        return trainer

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path``, before Lightning reads the checkpoint or any logger makes a folder.

        Raises:
            ConfigError: a config that jsonargparse rejects (the message is its one line).
            CheckpointError: ``ckpt_path`` is not a checkpoint that Lightning can load.
        """
        words = sys.argv[1:] if args is None else list(args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            subcommand = next((word for word in words if word in self._subcommand_parsers), None)
            options = parser if subcommand is None else self._subcommand_parsers[subcommand]
            names = [action.dest for action in options._actions]
            raise ConfigError(describe_parse_error(str(error), names, words)) from None
        subcommand = self.config.get("subcommand")
        check_checkpoint(self.config[subcommand].get("ckpt_path") if subcommand else None)

    def before_fit(self) -> None:
        """Record the run's seed with its hyperparameters, so every logger (W&B too) knows which seed it was; give
        the monitors without a ``report_dir`` the run's folder; keep a continued run's CSV history."""
        for callback in self.trainer.callbacks:
            if getattr(callback, "report_dir", False) is None:
                callback.report_dir = self.run_dir
        if self._resuming:
            for logger in self.trainer.loggers:
                continue_csv_log(logger)
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"seed_everything": seed})

    def after_fit(self) -> None:
        """Print the geometry summary and the report path (rank zero, when the run probed geometry), then the run
        folder and how to continue the run."""
        if not self.trainer.is_global_zero:
            return
        finish_wandb_runs(self.trainer.loggers)
        probed = any(isinstance(callback, GeometryMonitor) for callback in self.trainer.callbacks)
        if self._get(self.config, "summary") and probed and self.trainer.logger is not None:
            self._print_summary()
        config = os.path.join(self.run_dir, "config.yaml")
        print(f"\nRun folder: {self.run_dir} (continue: moe-lightning fit --config {config} --ckpt_path last)")

    def _print_summary(self) -> None:
        # The report stack (pandas, matplotlib) loads only here, after training.
        from moe_lightning.commands.run_summary import summarize_run

        try:
            table, index = summarize_run(self.run_dir)
        except Exception as error:  # noqa: BLE001 - the run is done and saved; a summary must not fail it
            rank_zero_warn(f"no geometry summary for this run: {type(error).__name__}: {error}")
            return
        print(f"\nGeometry of each MoE layer at the first and the last probe ({self.run_dir}):\n{table}")
        print(f"\nReport of the run: {index}")


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: jsonargparse wraps a config's own ValueError in several layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _subcommand(argv: list[str] | None) -> str:
    """``"fit "`` (the trainer subcommand of the command line, with a space), or ``""``."""
    words = sys.argv[1:] if argv is None else argv
    return next((f"{word} " for word in words if word in LightningCLI.subcommands()), "")


def main(argv: list[str] | None = None) -> int:
    """Run LightningCLI on ``argv``, the whole command line with its subcommand (default: ``sys.argv[1:]``).

    Returns:
        0; a bad config, option or checkpoint exits with code 2 after one line ``moe-lightning: error: ...`` on
        stderr that names it.
    """
    try:
        MoELightningCLI(args=argv)
    except (ConfigError, ArgumentError) as error:
        # ArgumentError: a later parse of jsonargparse, e.g. of the hyperparameters that --ckpt_path holds
        print(f"moe-lightning: error: {error}", file=sys.stderr)
        print(f"see: moe-lightning {_subcommand(argv)}--help", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:
        # A bad config value: say what was wrong and what is allowed, without a stack trace.
        print(f"moe-lightning: error: {_root_cause(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
