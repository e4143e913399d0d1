"""The monitors in the Hugging Face ``Trainer`` (and TRL's trainers, which are ``Trainer`` subclasses): a
``TrainerCallback`` that runs :class:`GeometryProbe`, :class:`RouterProbe` and :class:`CurvatureProbe`, logs through
the trainer's own reporting (``report_to``: W&B, TensorBoard, ...), saves their state with the trainer's checkpoints
and works under the trainer's DDP. Needs the ``hf`` extra; the package never imports this module, its user does."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from moe_lightning.monitors.curvature_probe import CurvatureProbe
from moe_lightning.monitors.geometry_probe import GeometryProbe
from moe_lightning.monitors.loop import start_curvature, start_geometry, unwrapped
from moe_lightning.monitors.ranks import Ranks
from moe_lightning.monitors.router_probe import RouterProbe

__all__ = ["MonitorCallback", "add_monitors"]

STATE_FILE = "moe_monitors.pt"


class MonitorCallback(TrainerCallback):
    """Run the monitors in a Hugging Face ``Trainer``; add it with :func:`add_monitors`.

    The geometry probe reads a fixed probe set, drawn from ``probe_data`` when training begins (every rank draws
    the same one, so pass a loader that is the same on every rank, not the trainer's sharded one) and probes at the
    steps of its schedule, ``state.global_step`` after each optimiser step; the router probe summarises every
    training forward (micro-batches of an accumulated step included) and logs each window; the curvature probe
    measures the loss on a fixed batch (``curvature_data``, by default the model's own ``model(**batch).loss``) at the
    steps of its schedule, with the trainer's optimiser for the edge-of-stability keys. Their values go through
    ``trainer.log``, so every ``report_to`` integration sees them at the trainer's ``global_step`` (W&B shows
    them under ``train/``, as all the trainer's training logs) and they land in ``trainer.state.log_history``. At each
    checkpoint their state is saved as ``moe_monitors.pt`` in the checkpoint's folder; a run resumed from it
    continues their schedule and window, without duplicates.

    Logged metrics: those of ``GeometryMonitor``, ``RouterMonitor`` and ``CurvatureMonitor`` (docs/callbacks.md),
    without the media (histograms, tables, heatmaps, densities): the trainer keeps every logged value in
    ``state.log_history``, which each checkpoint writes as JSON.

    Args:
        trainer: the trainer whose ``log`` the values go through.
        geometry: the geometry probe, or None.
        router: the router probe, or None.
        probe_data: an iterable of batches (a ``DataLoader``) or one batch (rank zero's is every rank's), from which
            the probe set is drawn.
        curvature: the curvature probe, or None.
        curvature_data: one batch, or a loader whose first batch is taken, on which the curvature is measured: the
            whole batch, as the model takes it (with ``labels`` for the model's own loss); rank zero's is every
            rank's. Default ``probe_data``.
    """

    def __init__(
        self,
        trainer: Trainer,
        geometry: GeometryProbe | None = None,
        router: RouterProbe | None = None,
        probe_data: Any = None,
        curvature: CurvatureProbe | None = None,
        curvature_data: Any = None,
    ) -> None:
        if geometry is not None and probe_data is None:
            raise ValueError("MonitorCallback: geometry needs probe_data, the batches its probe set is drawn from")
        if geometry is not None and geometry.beside.enabled:
            raise ValueError(
                "MonitorCallback: GeometryProbe(background=True) is not supported: the Trainer logs at its current "
                "step, and a probe computed beside training describes an earlier one; use background=False"
            )
        curvature_data = probe_data if curvature_data is None else curvature_data
        if curvature is not None and curvature_data is None:
            raise ValueError("MonitorCallback: curvature needs curvature_data or probe_data, the batch it measures on")
        self.trainer, self.geometry, self.router, self.probe_data = trainer, geometry, router, probe_data
        self.curvature, self.curvature_data = curvature, curvature_data

    def _log(self, values: dict[str, float]) -> None:
        # Every rank logs, as the trainer logs its loss: the values are the same on all of them.
        if values:
            self.trainer.log(dict(values))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ranks = Ranks.current(self.trainer.args.device)
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step > 0 and os.path.exists(saved):  # a resumed run: go on with the monitors' state
            self.load_state_dict(torch.load(saved, weights_only=False))
        values: dict[str, float] = {}
        if self.geometry is not None:
            values = start_geometry(self.geometry, model, self.probe_data, ranks, state.global_step)
        if self.curvature is not None:
            step, data = state.global_step, self.curvature_data
            values.update(start_curvature(self.curvature, unwrapped(model), data, ranks, step, optimizer))
        if self.router is not None:
            self.router.attach(model, ranks)
        self._log(values)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.router is not None:
            self.router.start_batch(state.global_step)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        # a micro-batch that only accumulated gradients: into the window, and the next one carries the same step
        if self.router is not None:
            self.router.end_batch(model, state.global_step, Ranks.current(self.trainer.args.device))
            self.router.start_batch(state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        ranks = Ranks.current(self.trainer.args.device)
        values: dict[str, float] = {}
        if self.router is not None:
            values.update(self.router.end_batch(model, state.global_step, ranks) or {})
        if self.geometry is not None:
            values.update(self.geometry(model, state.global_step, ranks))
        if self.curvature is not None:
            values.update(self.curvature(unwrapped(model), state.global_step, ranks, optimizer))
        self._log(values)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.geometry is not None:
            ranks = Ranks.current(self.trainer.args.device)
            self._log(self.geometry.end_epoch(model, round(state.epoch or 0), state.global_step, ranks))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        ranks = Ranks.current(self.trainer.args.device)
        values: dict[str, float] = {}
        if self.router is not None:
            values.update(self.router.end(ranks) or {})
            self.router.detach()
        if self.geometry is not None:
            values.update(self.geometry.end(model, state.global_step, ranks))
        if self.curvature is not None:
            values.update(self.curvature.end(unwrapped(model), state.global_step, ranks, optimizer))
        self._log(values)

    def on_save(self, args, state, control, **kwargs):
        # Every rank takes the state (the router's window is summed over the ranks); rank zero writes it.
        payload = self.state_dict()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(payload, os.path.join(folder, STATE_FILE))

    def state_dict(self) -> dict[str, Any]:
        return {
            "geometry": None if self.geometry is None else self.geometry.state_dict(),
            "router": None if self.router is None else self.router.state_dict(),
            "curvature": None if self.curvature is None else self.curvature.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.geometry is not None and state_dict.get("geometry") is not None:
            self.geometry.load_state_dict(state_dict["geometry"])
        if self.router is not None and state_dict.get("router") is not None:
            self.router.load_state_dict(state_dict["router"])
        if self.curvature is not None and state_dict.get("curvature") is not None:
            self.curvature.load_state_dict(state_dict["curvature"])


def add_monitors(
    trainer: Trainer,
    geometry: GeometryProbe | None = None,
    router: RouterProbe | None = None,
    probe_data: Any = None,
    curvature: CurvatureProbe | None = None,
    curvature_data: Any = None,
) -> MonitorCallback:
    """Add the monitors to a Hugging Face ``Trainer`` (or a TRL trainer) and return their callback.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=data)
        add_monitors(trainer, GeometryProbe(every_n_steps=100), RouterProbe(every_n_steps=10), probe_data=loader)
        trainer.train()

    With the curvature too, measured on a fixed batch that holds ``labels`` (the model's own loss)::

        add_monitors(trainer, curvature=CurvatureProbe(every_n_steps=500), curvature_data=next(iter(loader)))
    """
    callback = MonitorCallback(trainer, geometry, router, probe_data, curvature, curvature_data)
    trainer.add_callback(callback)
    return callback
