"""A GeometryProbe's probes computed beside training (``background=True``): the step captures each layer's inputs and
forks a child (:class:`~moe_lightning.monitors.background.ForkedCall`) that computes this rank's statistics of every
layer from them and from the weights of that step; when the child is done, the parent agrees failures over ranks,
sums the statistics over ranks and finalises them exactly as a probe in the step does, and logs the values at the
step they describe. A single process has nothing to sum, so its child finalises the reports too, and the step that
delivers them only logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import moe_lightning.geometry.spectra as spectra
from moe_lightning.common import is_fsdp_module, warn_once
from moe_lightning.geometry import GeometryReport, MoEView, finalize
from moe_lightning.monitors.background import ForkedCall, fork_unavailable, portable
from moe_lightning.monitors.health import finite_tensors
from moe_lightning.monitors.probe_set import model_device
from moe_lightning.monitors.ranks import Ranks, rank_zero_warn
from moe_lightning.monitors.sharded import expert_layout

if TYPE_CHECKING:
    from moe_lightning.monitors.geometry_probe import GeometryProbe


def _finalized(stats: Any) -> Any:
    """One layer's report from a single process's statistics, or the exception that stopped either."""
    if isinstance(stats, BaseException):
        return stats
    try:
        return finalize(stats)
    except Exception as error:
        return error


@dataclass
class InFlight:
    """A probe computed beside training: its child (or the error that kept it from starting), its step, the views it
    probes and whether the probe set was finite."""

    job: ForkedCall | None
    error: BaseException | None
    step: int
    views: list[MoEView]
    probe_set_finite: bool


class BesideTraining:
    """The probe in flight of one GeometryProbe, and whether probes still go beside training (a lost child turns
    it off for the rest of the run).

    Args:
        enabled: the probe's ``background``.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.in_flight: InFlight | None = None
        #: ``(step, CPU seconds, wall seconds)`` of each child that delivered (the share of a core each one had).
        self.child_times: list[tuple[int, float, float]] = []

    def available(self, probe: GeometryProbe, model: nn.Module) -> bool:
        """Whether ``probe``'s next probe of ``model`` can run beside training; where it was asked to and cannot,
        one warning says why."""
        if not self.enabled:
            return False
        device = model_device(model)
        sharded = any(is_fsdp_module(m) for m in model.modules()) or any(
            expert_layout(view, probe.probe_config)[0] is not None for view in probe.views or []
        )
        reason = fork_unavailable()
        if reason is None and device.type != "cpu":
            reason = f"the model is on {device}, and a forked process can probe a model on the CPU only"
        if reason is None and sharded:
            reason = "the layers are sharded over ranks (FSDP2 or expert parallelism), so each probe is a collective"
        if reason is not None:
            message = f"{probe.name}: background=True: {reason}; probing in the step instead"
            warn_once(message, probe._warned, rank_zero_warn)
        return reason is None

    def launch(self, probe: GeometryProbe, model: nn.Module, step: int, ranks: Ranks) -> None:
        """Capture the layers' inputs now (a collective) and fork the child that computes their statistics."""
        probe_set_finite = finite_tensors(probe.probe_inputs)
        with probe._observed_capture(model, ranks) as (captured, capture_error):
            views, threads = list(probe.views or []), torch.get_num_threads()

            def statistics() -> list[Any]:
                spectra.SVD_WORKERS = threads  # the SVDs on the parent's cores, where it leaves them idle
                stats = [probe._probe_layer(model, view, captured, capture_error, ranks) for view in views]
                if not ranks.distributed:  # nothing to sum over ranks: the report is finished here, not in the step
                    stats = [_finalized(s) for s in stats]
                return [portable(s) if isinstance(s, BaseException) else s for s in stats]

            job, error = None, None
            try:
                job = ForkedCall(statistics, warned=probe._warned)
            except Exception as caught:  # no process could be started: that probe fails, and training goes on
                error = caught
        self.in_flight = InFlight(job, error, step, views, probe_set_finite)

    def ready(self, ranks: Ranks) -> bool:
        """Whether the probe in flight has finished on every rank (a collective under several ranks)."""
        job = self.in_flight.job if self.in_flight is not None else None
        ready = job is None or job.ready()
        if ranks.distributed:  # the statistics are summed over ranks: every rank's child must be done
            flag = torch.tensor([float(ready)], device=ranks.device)
            ready = int(ranks.sum(flag).item()) == ranks.world_size
        return ready

    def collect(self, probe: GeometryProbe, ranks: Ranks) -> None:
        """Wait for the probe in flight and deliver it at its step through ``probe``. A child lost on any rank fails
        every layer at that step (one warning) and turns probing beside training off. A collective."""
        flight, self.in_flight = self.in_flight, None
        results, error = None, flight.error
        if flight.job is not None:
            try:
                results = flight.job.result()
                self.child_times.append((flight.step, *flight.job.times))
            except Exception as caught:
                error = caught
        lost = probe._failures.agree(ranks, error)
        reports: dict[str, GeometryReport] = {}
        if lost:
            self.enabled = False
            consequence = f"no values are logged at step {flight.step}, and later probes run in the step"
            probe._failures.report(ranks, "probing beside training", lost, consequence)
        else:
            for view, stats in zip(flight.views, results, strict=True):
                report = probe._finish_layer(view.name, stats, flight.step, ranks, flight.probe_set_finite)
                if report is not None:
                    reports[view.name] = report
        probe._deliver(reports, flight.step, ranks, beside=True)

    def cancel(self) -> None:
        """Stop the child in flight, if any, without delivering its probe."""
        flight, self.in_flight = self.in_flight, None
        if flight is not None and flight.job is not None:
            flight.job.cancel()
