"""Shared machinery of the callbacks: the trainer's ranks, the step axis, logging to every Lightning
logger and to ``trainer.callback_metrics``, and where the callbacks look for MoE layers. The saved reports are in
``_reports``, the media (histograms, tables, heatmaps) in ``_media``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn
from typing_extensions import override

from moe_lightning.monitors.ranks import Ranks


def ranks_of(trainer: Trainer) -> Ranks:
    """The trainer's ranks for the monitors' core: its sums go through the strategy's own ``reduce``."""
    return Ranks(
        trainer.global_rank,
        trainer.world_size,
        trainer.strategy.root_device,
        lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
    )


def logging_step(trainer: Trainer, after_batch: bool = False) -> int:
    """The step on the axis of Lightning's own ``self.log``: optimiser steps taken, counting a batch that steps
    several optimisers (manual optimisation) once.

    With ``after_batch`` (in ``on_train_batch_end``), a batch that has just stepped counts; a micro-batch that only
    accumulated gradients does not. With one optimiser this is ``trainer.global_step``. Lightning's loggers and its
    own LearningRateMonitor use this counter (``fit_loop.epoch_loop._batches_that_stepped``).
    """
    loop = trainer.fit_loop.epoch_loop
    steps = int(loop._batches_that_stepped)
    if after_batch and not loop._should_accumulate():
        steps += 1
    return steps


_PER_EXPERT = re.compile(r"/e\d+$")


def selected_metrics(metrics: dict[str, float], patterns: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The keys of ``metrics`` that go into ``trainer.callback_metrics``, as float tensors: those matching one of
    the fnmatch ``patterns``, or with None every key but the per-expert ones (``.../e<i>``)."""
    if patterns is None:
        chosen = {k: v for k, v in metrics.items() if not _PER_EXPERT.search(k)}
    else:
        chosen = {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return {k: torch.tensor(float(v)) for k, v in chosen.items()}


def check_metric_patterns(owner: str, patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``callback_metrics`` as given to a monitor: None (the default selection), one pattern or a list of them."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{owner}: callback_metrics must be None, a pattern or a list of patterns, got {patterns!r}")
    return tuple(patterns)


class PublishingCallback(Callback):
    """A monitor whose values also go into ``trainer.callback_metrics``, where ``ModelCheckpoint`` and
    ``EarlyStopping`` look for them. Lightning clears that dict after the sanity check, so the latest values are
    put back before every hook that may read them (these run before ``ModelCheckpoint``'s, which Lightning calls
    last)."""

    def __init__(self, owner: str, callback_metrics: str | Sequence[str] | None) -> None:
        super().__init__()
        self.callback_metrics = check_metric_patterns(owner, callback_metrics)
        self._published: dict[str, Tensor] = {}

    def publish(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Put the selected keys of ``metrics`` into ``trainer.callback_metrics`` (on every rank: the values are
        the same on all of them)."""
        self._published.update(selected_metrics(metrics, self.callback_metrics))
        trainer.callback_metrics.update(self._published)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.callback_metrics.update(self._published)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.callback_metrics.update(self._published)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.callback_metrics.update(self._published)


def log_scalars(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """The same scalar keys to every logger of the trainer, at the trainer's step (rank zero only)."""
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def define_step_metric(trainer: Trainer, prefix: str) -> None:
    """Plot every W&B key under ``prefix`` (e.g. ``"router/*"``) against ``trainer/global_step``, the step each
    callback logs at, instead of W&B's own call counter (rank zero only; other loggers need nothing)."""
    if not trainer.is_global_zero:
        return
    for logger in wandb_loggers(trainer):
        logger.experiment.define_metric("trainer/global_step")
        logger.experiment.define_metric(prefix, step_metric="trainer/global_step")


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def observed_model(pl_module: LightningModule) -> nn.Module:
    """Where the callbacks look for MoE layers: the LightningModule's ``model`` attribute when it is an
    ``nn.Module`` (the litgpt convention our modules follow, giving names like ``blocks.0.ffn``), else the
    LightningModule itself; inside ``torch.compile``'s wrapper, the module it compiled."""
    model = getattr(pl_module, "model", None)
    model = model if isinstance(model, nn.Module) else pl_module
    # torch.compile's wrapper (``self.model = torch.compile(self.model)``) holds the model as ``_orig_mod``
    compiled = model._modules.get("_orig_mod")
    return model if compiled is None else compiled
