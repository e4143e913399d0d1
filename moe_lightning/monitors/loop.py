"""LoopMonitors: the geometry, router and curvature probes in a training loop of your own (plain, or Accelerate's) in
a few lines. One object takes the probe set and the curvature's batch, hooks the router, calls each probe at its
point of a step with its step, logs what they return and removes its hooks at the end; the cores underneath are
unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moe_lightning.common import warn_once
from moe_lightning.common.observe import preserved_rng
from moe_lightning.monitors.curvature_probe import CurvatureProbe
from moe_lightning.monitors.geometry_probe import GeometryProbe, Log
from moe_lightning.monitors.ranks import Ranks, rank_zero_warn
from moe_lightning.monitors.router_probe import RouterProbe


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers a loop puts around it: DDP's (and DataParallel's) ``module``, and
    ``torch.compile``'s ``_orig_mod``; the MoE layers are found, and named, in it."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._modules["_orig_mod"]
        else:
            return model


def is_one_batch(probe_data: Any) -> bool:
    """Whether ``probe_data`` is one batch (a tensor, a dict, a list or tuple of them) rather than a loader."""
    return isinstance(probe_data, (torch.Tensor, dict, list, tuple))


def start_geometry(geometry: GeometryProbe, model: nn.Module, probe_data: Any, ranks: Ranks, step: int) -> dict:
    """Find the layers, take the probe set from ``probe_data`` (one batch: rank zero's for every rank; a loader:
    drawn in its order, which must be the same on every rank) unless a restored one is there, and probe the
    baseline at ``step`` if the schedule asks for it. Returns the values logged now. A collective."""
    geometry.find_layers(model, ranks)
    if is_one_batch(probe_data):
        return geometry.take_probe_set(model, probe_data, ranks, step, broadcast=True)
    geometry.draw_probe_set(model, probe_data, ranks)
    if geometry.probe_inputs is not None and geometry.schedule.at_start(step):
        geometry.probe(model, step, ranks)
        return dict(geometry.last_values)
    return {}


def start_curvature(
    curvature: CurvatureProbe, model: nn.Module, data: Any, ranks: Ranks, step: int, optimizer: Any = None
) -> dict:
    """Check the model, take the curvature's batch from ``data`` (one batch, or a loader's first batch; rank zero's
    is every rank's) unless a restored one is there, and compute the baseline at ``step`` if the schedule asks for
    it. Returns the values logged now. A collective."""
    curvature.setup(model, ranks)
    if curvature.batch is not None or curvature.disabled:
        return {}
    if is_one_batch(data):
        batch = data
    else:
        with preserved_rng():  # a shuffling loader draws its order from the global RNG, which training owns
            batch = next(iter(data), None)
    return curvature.take_batch(model, batch, ranks, step, broadcast=True, optimizer=optimizer)


class LoopMonitors:
    """The geometry, router and curvature probes in a training loop of your own.

    Give it the model, the data of the probe set and ``log``; then wrap each training step in :meth:`step`, or
    call :meth:`before_batch` before its forward and :meth:`after_step` after its optimiser step; then
    :meth:`close` (or use it as a context manager). It counts the steps: the router's window of a batch is
    labelled with the steps that made the weights routing it, the geometry probe runs after the optimiser step
    with the steps taken then, as in Lightning, and so does the curvature probe; so the values are those of
    ``GeometryMonitor``, ``RouterMonitor`` and ``CurvatureMonitor``. Values go to ``log(values, step)`` on rank
    zero; every rank makes every call (the sums over the ranks of ``torch.distributed`` are collectives).

    Args:
        model: the model being trained; a DDP or ``torch.compile`` wrapper is looked through.
        probe_data: one batch (rank zero's is every rank's) or a loader that is the same on every rank, from which
            the geometry probe's fixed probe set is taken; needed with ``geometry``.
        log: ``log(values, step)``, called on rank zero (``wandb.log``-like); give it here, not to the probes.
        geometry: the geometry probe, or None.
        router: the router probe, or None.
        start_step: the optimiser steps taken before the loop starts (a resumed run's); the baseline is probed
            here.
        curvature: the curvature probe, or None; its batch is ``curvature_data``.
        optimizer: the optimiser that trains the model (wrapped or not), whose edge-of-stability threshold the
            curvature probe logs; None logs none.
        curvature_data: one batch, or a loader whose first batch is taken, on which the curvature is measured (the
            whole batch, targets included, as its loss takes it); default ``probe_data``. Rank zero's is every
            rank's.

    Example::

        with LoopMonitors(model, probe_batch, log, GeometryProbe(every_n_steps=100), RouterProbe()) as monitors:
            for batch in loader:
                with monitors.step():
                    train_step(model, batch)
    """

    def __init__(
        self,
        model: nn.Module,
        probe_data: Any = None,
        log: Log | None = None,
        geometry: GeometryProbe | None = None,
        router: RouterProbe | None = None,
        start_step: int = 0,
        curvature: CurvatureProbe | None = None,
        optimizer: Any = None,
        curvature_data: Any = None,
    ) -> None:
        if geometry is not None and probe_data is None:
            raise ValueError("LoopMonitors: geometry needs probe_data, the batch or loader of its probe set")
        if geometry is not None and geometry.beside.enabled:
            raise ValueError(
                "LoopMonitors: GeometryProbe(background=True) is not supported here; call the probe from your loop "
                "with its own log(values, step), which gets each value at the step it describes"
            )
        curvature_data = probe_data if curvature_data is None else curvature_data
        if curvature is not None and curvature_data is None:
            raise ValueError("LoopMonitors: curvature needs curvature_data or probe_data, the batch it measures on")
        for probe in (geometry, router, curvature):
            if probe is not None and probe.log is not None and log is not None:
                raise ValueError(f"LoopMonitors: {probe.name} has a log of its own; give log to LoopMonitors only")
        self.model, self.log, self.geometry, self.router = unwrapped(model), log, geometry, router
        self.curvature, self.optimizer = curvature, optimizer
        self.steps, self.ranks = start_step, Ranks.current()
        self._batch_step: int | None = None  # the steps before the open batch; None between batches
        self._last_batch_step = start_step  # the label of the router's open window: the steps before its last batch
        self._closed = False
        self._warned: set[str] = set()
        if geometry is not None:
            self._log(start_geometry(geometry, self.model, probe_data, self.ranks, start_step), start_step)
        if curvature is not None:
            values = start_curvature(curvature, self.model, curvature_data, self.ranks, start_step, optimizer)
            self._log(values, start_step)
        if router is not None:
            router.attach(self.model, self.ranks)

    def before_batch(self, step: int | None = None) -> None:
        """Before a training batch's forward; ``step``, the optimiser steps taken so far, sets the count (default:
        the count kept here). Every micro-batch of an accumulated step calls it."""
        if step is not None:
            self.steps = step
        self._batch_step = self._last_batch_step = self.steps
        if self.router is not None:
            self.router.start_batch(self.steps)

    def after_step(self, stepped: bool = True) -> dict[str, float]:
        """After a training batch and its optimiser step; ``stepped=False`` for a micro-batch that only accumulated
        gradients (under Accelerate, ``stepped=accelerator.sync_gradients``). Logs and returns what the probes give
        now."""
        if self._batch_step is None:
            raise RuntimeError("LoopMonitors: after_step without before_batch")
        label, self._batch_step = self._batch_step, None
        self.steps = label + int(stepped)
        values: dict[str, float] = {}
        if self.router is not None:
            values.update(self._log(self.router.end_batch(self.model, self.steps, self.ranks) or {}, label))
        if self.geometry is not None and stepped:
            values.update(self._log(self.geometry(self.model, self.steps, self.ranks), self.steps))
        if self.curvature is not None and stepped:
            found = self.curvature(self.model, self.steps, self.ranks, self.optimizer)
            values.update(self._log(found, self.steps))
        return values

    @contextlib.contextmanager
    def step(self, step: int | None = None, stepped: bool = True) -> Iterator[LoopMonitors]:
        """:meth:`before_batch` on entry, :meth:`after_step` on a normal exit (an exception leaves the window
        open and propagates)."""
        self.before_batch(step)
        yield self
        self.after_step(stepped)

    def close(self) -> dict[str, float]:
        """When training ends: log the router's last window, the final geometry probe and the final curvature, and
        remove the hooks. Returns the values logged now; a second call does nothing."""
        if self._closed:
            return {}
        self._closed = True
        values: dict[str, float] = {}
        if self.router is not None:
            values.update(self._log(self.router.end(self.ranks) or {}, self._last_batch_step))
            self.router.detach()
        if self.geometry is not None:
            values.update(self._log(self.geometry.end(self.model, self.steps, self.ranks), self.steps))
        if self.curvature is not None:
            found = self.curvature.end(self.model, self.steps, self.ranks, self.optimizer)
            values.update(self._log(found, self.steps))
        return values

    def __enter__(self) -> LoopMonitors:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            self.close()
        elif self.router is not None:  # training failed: no last probe (a collective other ranks may not reach)
            self.router.detach()

    def _log(self, values: dict[str, float], step: int) -> dict[str, float]:
        if values and self.log is not None and self.ranks.is_global_zero:
            try:
                self.log(dict(values), step)
            except Exception as error:  # a logger that fails must not stop training
                warn_once(f"LoopMonitors: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)
        return values
