"""Shared machinery of the callbacks: copying batches into callback state, the step axis, logging to every Lightning
logger and to ``trainer.callback_metrics``, and where the callbacks look for MoE layers. The saved reports are in
``_reports``, the media (histograms, tables, heatmaps) in ``_media``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from moe_lightning.common import warn_once
from moe_lightning.common.observe import StateChanges


def batch_inputs(batch: Any, input_key: str | int = 0) -> Any:
    """The model input of a batch: ``batch[input_key]`` of a tuple/list/dict, or the batch itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch[input_key if isinstance(input_key, str) else "input_ids"]
    if isinstance(batch, (list, tuple)):
        return batch[input_key if isinstance(input_key, int) else 0]
    raise ValueError(f"cannot take model inputs from a batch of type {type(batch).__name__}; pass input_key")


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of a batch (tensors, or dicts/lists/tuples of them), for callback state."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


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


def warn_state_changes(owner: str, changes: StateChanges, store: set[str]) -> None:
    """Warn once when a monitor's forward passes changed state the model keeps outside its buffers that could not be
    set back (written in place): what was lost, and what was set back beside it. State that was set back whole
    (buffers, an attribute given a new value, as DeepSpeed's ``l_aux``) leaves training as it was: no warning."""
    lost = [c for c in changes if c not in changes.restored]
    if not lost:
        return
    message = (
        f"{owner}: the model's forward pass changes state it keeps outside its buffers: "
        + ", ".join(changes)
        + (f"; set back: {', '.join(changes.restored)}" if changes.restored else "")
        + (f"; written in place and not restored: {', '.join(lost)}" if lost else "")
        + ". Pass forward= (or loss_fn=) to run the model so that it keeps nothing (docs/callbacks.md, "
        "'What observation does not cover')"
    )
    warn_once(message, store, rank_zero_warn)
