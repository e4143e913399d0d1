"""``moe-lightning fit | validate | test | predict``: LightningCLI with moe-lightning's defaults. Lightning loads
with this module, so the dispatcher in :mod:`moe_lightning.commands` imports it only when one of these commands runs.

Examples:
    moe-lightning fit --config configs/mlp/topk.yaml --config configs/trainer/cpu.yaml
    moe-lightning fit --config configs/mlp/soft.yaml --trainer.logger=CSVLogger --trainer.logger.save_dir=runs
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from moe_lightning.callbacks import GeometryMonitor

DEFAULT_LOGGER = {"class_path": "moe_lightning.lightning.loggers.AutoWandbLogger", "init_args": {"save_dir": "runs"}}


class MoELightningCLI(LightningCLI):
    """LightningCLI with moe-lightning's defaults: any LightningModule / DataModule by ``class_path``, the W&B
    logger (offline when needed) unless another is chosen, and the config saved next to the logs."""

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
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


def main(argv: list[str] | None = None) -> int:
    """Run LightningCLI on ``argv``, the whole command line with its subcommand (default: ``sys.argv[1:]``).

    Returns:
        0; a bad config value exits with code 2 after ``moe-lightning: error: ...`` on stderr.
    """
    try:
        MoELightningCLI(args=argv)
    except ValueError as error:
        # A bad config value: say what was wrong and what is allowed, without a stack trace.
        print(f"moe-lightning: error: {_root_cause(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
