"""GeometryProbe: the loop-agnostic core of the geometry monitor. Jacobian spectra, weighted PCA, alignment and
Grassmann distances of every MoE layer, probed on a fixed token set at the steps of its schedule
(docs/geometry.md §1-5), from any training loop: Lightning's (``GeometryMonitor``), the Hugging Face Trainer's, an
Accelerate loop or a plain one (docs/without-lightning.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.common import check_positive_int, dtype_from_name, observation
from moe_lightning.geometry import GeometryReport, MoEView, ProbeConfig, finalize
from moe_lightning.monitors.geometry_beside import BesideTraining
from moe_lightning.monitors.health import LayerIncidents, finite_tensors, split_failures
from moe_lightning.monitors.observe import warn_state_changes
from moe_lightning.monitors.probe_set import batch_inputs, cpu_copy, draw_probe_set, model_device
from moe_lightning.monitors.ranks import Failures, Ranks, rank_zero_warn
from moe_lightning.monitors.schedule import Schedule, warn_if_stale
from moe_lightning.monitors.sharded import layer_statistics
from moe_lightning.monitors.verify import drop_unverified_views

_PROBE_DTYPES = ("float64", "float32")
Log = Callable[[dict[str, float], int], Any]
Deliver = Callable[[int, dict[str, GeometryReport], dict[str, float]], Any]


class GeometryProbe:
    r"""Probe the local function geometry and the representation geometry of every MoE layer, from any loop.

    The probe set, a fixed token set taken once (:meth:`take_probe_set` from a batch, or :meth:`draw_probe_set`
    from a loader), is kept in :meth:`state_dict`, so every point of a curve probes the same tokens. Call the probe
    after each optimiser step with the number of steps taken (``probe(model, step)``); at the steps of its schedule
    it captures each MoE layer's inputs on the probe set with temporary forward hooks, probes them
    (:func:`moe_lightning.geometry.probe_statistics`), sums the statistics over the ranks of
    ``torch.distributed`` (each rank probes its share of the tokens), hands the scalars to ``log`` on rank zero and
    returns them. The model is only observed: modes, buffers, RNG states, gradients and autocast are restored and
    no parameter is written, so training ends in the same weights with or without it. A failure on any rank
    becomes one warning, and training goes on. The keys are those of ``GeometryMonitor`` (docs/callbacks.md).

    Args:
        every_n_steps: probe when the step is a multiple of this; None disables.
        every_n_epochs: probe at the end of every n-th epoch (:meth:`end_epoch`); None disables.
        at_start: probe once before the first step, the initialisation baseline.
        at_end: probe once in :meth:`end`, at the last step, unless that step was probed already.
        max_tokens: tokens per layer in the probe set.
        min_tokens_per_expert: draw batches until every expert's ``n_eff`` reaches this (see ``GeometryMonitor``).
        bootstrap: B, multinomial resamples of the probe tokens for the bootstrapped quantities.
        layers: layer names or glob patterns; None probes every MoE layer found.
        jacobian: compute the expert Jacobian spectra.
        layer_jacobian: compute the layer Jacobian spectra.
        pca: compute the weighted PCA of the routed representations.
        alignment: compute the cross-expert Jacobian alignment.
        subspaces: compute the Grassmann distances between expert subspaces.
        dtype: ``"float64"`` (default) or ``"float32"``.
        memory_budget_bytes: peak memory of one Jacobian chunk.
        subspace_rank: ``r`` of the Grassmann subspaces.
        max_expert_keys: per-expert keys for at most this many experts per layer; None all.
        input_key: which element of a batch is the model input (index or dict key).
        forward: ``forward(model, inputs)`` that runs the model on the probe set; default ``model(inputs)``.
        probe_config: extra :class:`~moe_lightning.geometry.ProbeConfig` fields.
        background: compute each probe beside training, in a forked child at the lowest CPU priority; the values
            reach ``log`` at the step they describe when they are ready. Linux, a model on the CPU, no FSDP2 or expert
            parallelism; elsewhere the probe runs in the step, with one warning why (docs/callbacks.md).
        log: ``log(values, step)``, called on rank zero with every probe's scalars (``wandb.log``-like).
        name: the name the warnings and errors begin with.

    Example::

        probe = GeometryProbe(every_n_steps=100, log=lambda values, step: wandb.log(values, step=step))
        probe.take_probe_set(model, next(iter(loader)))
        for step, batch in enumerate(loader, start=1):
            train_step(model, batch)
            probe(model, step)
        probe.end(model, step)
    """

    def __init__(
        self,
        every_n_steps: int | None = 600,
        every_n_epochs: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        max_tokens: int = 256,
        min_tokens_per_expert: int | None = None,
        bootstrap: int = 0,
        layers: str | list[str] | None = None,
        jacobian: bool = True,
        layer_jacobian: bool = True,
        pca: bool = True,
        alignment: bool = True,
        subspaces: bool = True,
        dtype: str = "float64",
        memory_budget_bytes: int = 256 * 2**20,
        subspace_rank: int = 8,
        max_expert_keys: int | None = 16,
        input_key: str | int = 0,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        probe_config: dict[str, Any] | None = None,
        background: bool = False,
        log: Log | None = None,
        name: str = "GeometryProbe",
    ) -> None:
        for option, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            check_positive_int(f"{name}: {option}", value, allow_none=True)
        check_positive_int(f"{name}: max_tokens", max_tokens)
        check_positive_int(f"{name}: min_tokens_per_expert", min_tokens_per_expert, allow_none=True)
        probe_dtype = dtype_from_name(f"{name}: dtype", dtype, _PROBE_DTYPES)
        if max_expert_keys is not None and max_expert_keys < 0:
            raise ValueError(f"{name}: max_expert_keys must be >= 0 or None, got {max_expert_keys!r}")
        self.name, self.log = name, log
        self.schedule = Schedule(every_n_steps, at_start, every_n_epochs, at_end)
        self.max_tokens, self.layers, self.min_tokens_per_expert = max_tokens, layers, min_tokens_per_expert
        self.max_expert_keys, self.input_key, self.forward = max_expert_keys, input_key, forward
        # Validated now, so a wrong option fails before training starts.
        self.probe_config = ProbeConfig(
            jacobian=jacobian,
            layer_jacobian=layer_jacobian,
            pca=pca,
            alignment=alignment,
            subspaces=subspaces,
            dtype=probe_dtype,
            memory_budget_bytes=memory_budget_bytes,
            subspace_rank=subspace_rank,
            **{"bootstrap": bootstrap, **(probe_config or {})},
        )
        # How the probe set reaches the model: a loop with mixed precision converts inputs and wraps the forward.
        self.convert_input: Callable[[Any], Any] = lambda inputs: inputs
        self.forward_context: Callable[[], Any] = contextlib.nullcontext
        self.views: list[MoEView] | None = None  # None until the layers are found
        self.views_checked = False  # each layer's views are checked at the first probe (monitors/verify.py)
        # State kept across checkpoints: the probe set, the steps already probed, each layer's last logged step.
        self.probe_inputs: list[Any] | None = None
        self.logged_steps: dict[str, int] = {}
        self.last_reports: dict[str, GeometryReport] = {}
        self.last_values: dict[str, float] = {}
        self._failures = Failures(name)
        self._incidents = LayerIncidents(name)
        self._warned: set[str] = set()
        # Beside training: the probe in flight, and how a finished probe reaches the loop (a callback's logging).
        self.beside = BesideTraining(background)
        self.on_delivery: Deliver | None = None
        self._deliveries = 0

    @property
    def probed_steps(self) -> list[int]:
        """The steps probed so far (kept in :meth:`state_dict`)."""
        return self.schedule.done

    # ------------------------------------------------------------------ the loop's calls
    def __call__(self, model: nn.Module, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """After the optimiser step that made ``step`` steps: probe if the schedule says so, and deliver a probe
        computed beside training that has finished (to ``log``, at its own step). Returns the values of a probe run
        in this step, empty when none. Every rank calls it."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        before = self._deliveries
        self.poll(ranks)
        if self.schedule.after_batch(step):
            self.probe(model, step, ranks)
        return self._delivered_since(before)

    def end_epoch(self, model: nn.Module, epochs_done: int, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """At the end of an epoch: probe if ``every_n_epochs`` says so. Returns the values logged now."""
        ranks = ranks or Ranks.current()
        before = self._deliveries
        if self.schedule.after_epoch(epochs_done, step):
            self.probe(model, step, ranks)
        return self._delivered_since(before)

    def end(self, model: nn.Module, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """When training ends at ``step``: the probe in flight, then the final probe (``at_end``, in the step), then a
        warning if a layer's last values lie far from ``step``. Returns the values logged now. Every rank calls
        it."""
        ranks = ranks or Ranks.current()
        before = self._deliveries
        self.finish(ranks)
        if self.probe_inputs is not None and self.views and self.schedule.at_end(step):
            self.probe(model, step, ranks, wait=True)
        if self.views:
            last = {view.name: self.logged_steps.get(view.name) for view in self.views}
            warn_if_stale(self.name, last, step, self.schedule)
        return self._delivered_since(before)

    def poll(self, ranks: Ranks | None = None) -> None:
        """Deliver the probe computed beside training if it has finished (on several ranks: on every rank). A
        collective under several ranks while a probe is in flight: every rank calls it at the same point."""
        if self.beside.in_flight is not None and self.beside.ready(ranks := ranks or Ranks.current()):
            self.beside.collect(self, ranks)

    def finish(self, ranks: Ranks | None = None) -> None:
        """Wait for the probe computed beside training, if one is in flight, and deliver it. A collective."""
        if self.beside.in_flight is not None:
            self.beside.collect(self, ranks or Ranks.current())

    def close(self) -> None:
        """Stop the probe in flight without delivering it (training stopped early)."""
        self.beside.cancel()

    def _delivered_since(self, count: int) -> dict[str, float]:
        return dict(self.last_values) if self._deliveries != count else {}

    # ------------------------------------------------------------------ layers and probe set
    def find_layers(
        self,
        model: nn.Module,
        ranks: Ranks | None = None,
        prepare: Callable[[], Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        """Find the MoE layers of ``model`` (``prepare()`` first, if given); a failure on any rank, or no layer,
        is one warning (naming ``model_name``, by default the model's class), and nothing is probed. A
        collective."""
        ranks = ranks or Ranks.current()

        def find() -> None:
            if prepare is not None:
                prepare()
            self.views, self.views_checked = find_moe_layers(model, self.layers), False

        if not self._failures.run(ranks, "finding the MoE layers", find, "nothing will be probed"):
            self.views = []
        elif not self.views:
            patterns = "" if self.layers is None else f" matching {self.layers!r}"
            rank_zero_warn(
                f"{self.name}: no MoE layers{patterns} found in {model_name or type(model).__name__}; "
                "nothing will be probed (see moe_lightning.adapters.register_adapter)"
            )

    def _ensure_layers(self, model: nn.Module, ranks: Ranks) -> None:
        if self.views is None:
            self.find_layers(model, ranks)

    def take_probe_set(
        self,
        model: nn.Module,
        batch: Any,
        ranks: Ranks | None = None,
        step: int = 0,
        broadcast: bool = False,
        baseline: bool = True,
    ) -> dict[str, float]:
        """Keep a CPU copy of ``batch``'s model inputs as the probe set, if there is none yet (a restored one is
        kept), and with ``baseline`` probe the baseline at ``step`` if the schedule asks for one. With
        ``broadcast``, rank zero's batch is every rank's (a loop whose ranks see different batches). Returns the
        values logged now."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        if self.probe_inputs is not None or not self.views:
            return {}

        def take() -> None:
            inputs = [cpu_copy(batch_inputs(batch, self.input_key))]
            if broadcast and ranks.distributed:
                holder = [inputs]
                dist.broadcast_object_list(holder, src=0)
                inputs = holder[0]
            self.probe_inputs = inputs

        if not self._failures.run(ranks, "taking the probe set", take, "nothing will be probed"):
            self.views, self.probe_inputs = [], None
            return {}
        before = self._deliveries
        if baseline and self.schedule.at_start(step):
            self.probe(model, step, ranks)
        return self._delivered_since(before)

    def draw_probe_set(self, model: nn.Module, loader: Iterable[Any] | None, ranks: Ranks | None = None) -> None:
        """Draw the probe set from ``loader``'s batches, in its order
        (:func:`~moe_lightning.monitors.probe_set.draw_probe_set`), if there is none yet; the same on every rank
        when the loader is. The model's state and the global RNG are restored afterwards. A collective."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        if self.probe_inputs is not None or not self.views or loader is None:
            return

        def draw() -> None:
            with observation(model) as changes:
                args = (self.input_key, self.max_tokens, self.min_tokens_per_expert)
                self.probe_inputs = draw_probe_set(loader, self.views, lambda b: self._capture(model, b), *args)
            warn_state_changes(self.name, changes, self._warned)

        if not self._failures.run(ranks, "drawing the probe set", draw, "nothing will be probed"):
            self.views, self.probe_inputs = [], None

    # ------------------------------------------------------------------ the probe
    def _capture(self, model: nn.Module, inputs: list[Any]) -> dict[str, Tensor]:
        """Each probed layer's inputs on ``inputs``, converted as the loop converts a batch, in its forward context,
        without autocast."""
        inputs = [self.convert_input(x) for x in inputs]
        with self.forward_context(), torch.autocast(device_type=model_device(model).type, enabled=False):
            return capture_layer_inputs(model, self.views or [], inputs, self.forward, model_device(model))

    def probe(
        self, model: nn.Module, step: int, ranks: Ranks | None = None, wait: bool = False
    ) -> dict[str, GeometryReport]:
        """Probe every layer now, at ``step``, whatever the schedule; hand the scalars to ``log`` (rank zero) and
        return the reports. A layer whose probe failed on any rank, whose weights hold NaN/Inf or whose every
        probe token reached it with NaN/Inf inputs has none. With ``background`` (and not ``wait``) the layers'
        inputs are captured now and the probe is computed beside training: it returns no reports, and the values
        reach ``log`` later, at ``step``. A collective: every rank calls it."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        self.finish(ranks)  # the probe in flight first: values are delivered in the order of their steps
        self.schedule.done.append(step)
        if not self.probe_inputs or not self.views:
            self.last_values = {}
            return {}
        if not wait and self.beside.available(self, model):
            self.beside.launch(self, model, step, ranks)
            return {}
        return self._deliver(self._probe_layers(model, step, ranks), step, ranks)

    def _deliver(
        self, reports: dict[str, GeometryReport], step: int, ranks: Ranks, beside: bool = False
    ) -> dict[str, GeometryReport]:
        """A finished probe's values to ``log`` (rank zero) and ``on_delivery``; a probe in the step's also to the
        return value of the loop call that made it (a probe beside training describes an earlier step)."""
        self.last_reports = reports
        self.logged_steps.update(dict.fromkeys(reports, step))
        scalars: dict[str, float] = {}
        for name, report in reports.items():
            scalars.update(report.scalars(f"geometry/{name}", max_experts=self.max_expert_keys))
        self.last_values = scalars
        self._deliveries += int(not beside)
        ranks.send(self.log, scalars, step, self.name, self._warned)
        if self.on_delivery is not None:
            self.on_delivery(step, reports, scalars)
        return reports

    def _probe_layers(self, model: nn.Module, step: int, ranks: Ranks) -> dict[str, GeometryReport]:
        reports: dict[str, GeometryReport] = {}
        probe_set_finite = finite_tensors(self.probe_inputs)
        with self._observed_capture(model, ranks) as (captured, capture_error):
            for view in self.views:
                stats = self._probe_layer(model, view, captured, capture_error, ranks)
                report = self._finish_layer(view.name, stats, step, ranks, probe_set_finite)
                if report is not None:
                    reports[view.name] = report
        return reports

    @contextlib.contextmanager
    def _observed_capture(self, model: nn.Module, ranks: Ranks) -> Iterator[tuple[dict[str, Tensor], Exception | None]]:
        """While ``model`` is observed: each layer's inputs on the probe set, or the error that stopped the capture,
        the views checked at the first probe; a change to the model's state is warned about on exit. A collective."""
        with observation(model) as changes:
            captured, capture_error = {}, None
            try:
                captured = self._capture(model, self.probe_inputs)
            except Exception as caught:  # every rank still enters each layer's agreement
                capture_error = caught
            drop_unverified_views(self, ranks, model, captured, capture_error)
            yield captured, capture_error
        warn_state_changes(self.name, changes, self._warned)

    def _finish_layer(self, name: str, stats: Any, step: int, ranks: Ranks, finite_set: bool) -> GeometryReport | None:
        """One layer's report from this rank's statistics (or the exception that stopped them, or the report a
        single process's child finished beside training): failures agreed over ranks and reported, the statistics
        summed over ranks and finalised; None where nothing can be logged. A collective."""
        failures = self._failures.agree(ranks, stats if isinstance(stats, BaseException) else None)
        nonfinite, failures = split_failures(failures)
        self._incidents.weights(name, step, nonfinite)
        if failures:
            self._failures.report(ranks, "the probe", failures, f"no values of {name!r} are logged at step {step}")
        if failures or nonfinite:
            return None
        reduce_fn, report = ranks.sum_fn(), stats  # a GeometryReport: a single process's, finished beside training
        if not isinstance(stats, GeometryReport):
            report = finalize(stats if reduce_fn is None else stats.reduce(reduce_fn, ranks.gather_rows))
        self._incidents.inputs(name, step, report.nonfinite_tokens, report.total_tokens, finite_set)
        return report if report.total_tokens else None  # with no finite token every value would be NaN

    def _probe_layer(
        self, model: nn.Module, view: MoEView, captured: dict[str, Tensor], capture_error: BaseException | None, ranks
    ) -> Any:
        """This rank's statistics of one layer, or the exception that stopped them (:func:`layer_statistics`)."""
        x = captured.get(view.name)
        x = None if x is None else x[: self.max_tokens]
        return layer_statistics(model, view, x, capture_error, ranks, self.probe_config)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The probe set, the steps probed and each layer's last logged step."""
        return {
            "probe_inputs": self.probe_inputs,
            "probed_steps": list(self.probed_steps),
            "logged_steps": dict(self.logged_steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_inputs = state_dict.get("probe_inputs")
        self.schedule.done = list(state_dict.get("probed_steps", []))
        self.logged_steps = dict(state_dict.get("logged_steps", {}))
