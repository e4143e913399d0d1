"""``moe-lightning fit | validate | test | predict``: LightningCLI with moe-lightning's defaults. Lightning loads
with this module, so the dispatcher in :mod:`moe_lightning.commands` imports it only when one of these commands runs.

Examples:
    moe-lightning fit --config configs/mlp/topk.yaml --config configs/trainer/cpu.yaml
    moe-lightning fit --config configs/mlp/soft.yaml --trainer.logger=CSVLogger --trainer.logger.save_dir=runs
"""

from __future__ import annotations

import sys
from argparse import ArgumentError

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.commands.checkpoint import check_checkpoint
from moe_lightning.commands.config_errors import describe_parse_error

DEFAULT_LOGGER = {"class_path": "moe_lightning.lightning.loggers.AutoWandbLogger", "init_args": {"save_dir": "runs"}}


class ConfigError(ValueError):
    """A command line or config that cannot run; its message is the one line the user sees."""


class MoELightningCLI(LightningCLI):
    """LightningCLI with moe-lightning's defaults: any LightningModule / DataModule by ``class_path``, the W&B
    logger (offline when needed) unless another is chosen, and the config saved next to the logs."""

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        # jsonargparse raises instead of printing every option's usage: parse_arguments turns it into one line.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--summary",
            type=bool,
            default=True,
            help="After fit, print each MoE layer's geometry at the first and the last probe and write the run's "
            "local report (needs GeometryMonitor among the callbacks).",
        )

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
        """Record the run's seed with its hyperparameters, so every logger (W&B too) knows which seed it was."""
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"seed_everything": seed})

    def after_fit(self) -> None:
        """Print the geometry summary and the report path (rank zero, when the run probed geometry)."""
        if not self._get(self.config, "summary") or not self.trainer.is_global_zero or self.trainer.logger is None:
            return
        if not any(isinstance(callback, GeometryMonitor) for callback in self.trainer.callbacks):
            return
        # The report stack (pandas, matplotlib) loads only here, after training.
        from moe_lightning.commands.run_summary import run_directory, summarize_run

        try:
            directory = run_directory(self.trainer.logger)
            if directory is None:
                return
            table, index = summarize_run(directory)
        except Exception as error:  # noqa: BLE001 - the run is done and saved; a summary must not fail it
            rank_zero_warn(f"no geometry summary for this run: {type(error).__name__}: {error}")
            return
        print(f"\nGeometry of each MoE layer at the first and the last probe ({directory}):\n{table}")
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
