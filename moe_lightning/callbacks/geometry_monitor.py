"""GeometryMonitor: Jacobian spectra, weighted PCA, alignment and Grassmann distances of every MoE layer,
probed on a fixed token set over the course of training (docs/geometry.md §1-5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.callbacks._guard import Failures, sum_over_ranks
from moe_lightning.callbacks._health import LayerIncidents, finite_tensors, nonfinite_weights, split_failures
from moe_lightning.callbacks._media import log_geometry_media
from moe_lightning.callbacks._observe import (
    PublishingCallback,
    batch_inputs,
    cpu_copy,
    define_step_metric,
    log_scalars,
    logging_step,
    observed_model,
    warn_state_changes,
)
from moe_lightning.callbacks._probe_set import bootstrap_columns, draw_probe_set, probe_loader
from moe_lightning.callbacks._reports import save_geometry_reports
from moe_lightning.callbacks._schedule import Schedule, warn_if_stale
from moe_lightning.callbacks._sharded import expert_layout, gathered
from moe_lightning.callbacks._verify import drop_unverified_views
from moe_lightning.common import check_choice, check_positive_int, dtype_from_name, observation, warn_once
from moe_lightning.geometry import GeometryReport, MoEView, ProbeConfig, finalize, probe_statistics

_PROBE_DTYPES = ("float64", "float32")
_SOURCES = ("val", "train")


class GeometryMonitor(PublishingCallback):
    r"""Probe the local function geometry and the representation geometry of every MoE layer during training.

    A probe set is drawn once, deterministically, from the validation (or training) dataloader and kept in the
    callback's state, so every point of a curve probes the same tokens. At each scheduled step the callback
    captures each MoE layer's inputs on that set with temporary forward hooks, runs
    :func:`moe_lightning.geometry.probe` on them, and logs the results. The model is only observed: the probe
    reads cast copies of the weights and never writes a parameter; modes, buffers, RNG states, gradients and
    autocast are restored, so training ends in the same weights with or without it (docs/callbacks.md). A probe
    that fails, on any rank, becomes one warning and training goes on. A layer whose weights hold NaN/Inf is not
    probed and logs nothing, with one warning naming the layer and the step, until its weights are finite again.

    Steps are those of Lightning's own ``self.log``: optimiser steps, a batch that steps several optimisers
    counted once. The selected values also go into ``trainer.callback_metrics``, so that ``ModelCheckpoint`` and
    ``EarlyStopping`` can monitor them.

    Logged metrics (docs/design.md "Metric keys"; ``<layer>`` is the module path, ``e<i>`` an expert):
        - ``geometry/<layer>/<quantity>/e<i>`` and ``.../mean`` for per-expert quantities: ``jac_sigma_max``,
          ``jac_frobenius``, ``jac_stable_rank``, ``jac_effective_rank``, ``jac_decay_slope``, ``tokens``,
          ``n_eff``, ``pca_<site>_{effective_rank,participation_ratio,n90,n_eff}`` for sites input/hidden/output;
        - ``geometry/<layer>/<quantity>`` for layer-level ones: ``layer_jac_*``, ``align_*``, ``palign_*``,
          ``subspace_*``, ``nonfinite_tokens``, ``empty_experts``;
        - with W&B: spectra as ``wandb.Histogram`` and a ``geometry/spectra`` table (step, layer, expert, index,
          sigma), alignment and overlap matrices as heatmap images; with TensorBoard: spectra histograms.

    Args:
        every_n_steps: probe when ``trainer.global_step`` is a multiple of this; None disables.
        every_n_epochs: probe at the end of every n-th training epoch; None disables.
        at_fit_start: probe once at fit start, the initialisation baseline.
        at_fit_end: probe once when training ends, at its last step, unless that step was probed already, so that
            the run's last values describe the trained model. When a layer's last values lie far from the last step
            all the same (this off, or the last probe logged nothing for it), a warning says so.
        max_tokens: tokens per layer in the probe set; with ``min_tokens_per_expert``, the budget the draw may not
            exceed.
        min_tokens_per_expert: draw validation batches until every expert of every probed layer has an effective
            sample size ``n_eff = (Σw)²/Σw²`` (docs/geometry.md §3) of at least this many tokens, on the model at
            fit start, or until ``max_tokens`` (then a warning names the experts short of it). None (default)
            draws ``max_tokens`` tokens. ``2·D`` makes a PCA of width ``D`` well sampled.
        bootstrap: B, multinomial resamples of the probe tokens on which each probe recomputes its bootstrapped
            quantities (:mod:`moe_lightning.geometry.bootstrap`), saved under ``"bootstrap"`` in each layer's
            entry of ``geometry/step_<step>.json``; 0 (default) computes none. The resamples depend only on the
            number of probe tokens and ``probe_config["bootstrap_seed"]`` (default 0).
        source: draw the probe set from ``"val"`` or ``"train"`` data (train is the fallback when there is no
            validation data).
        layers: layer names or glob patterns (``"blocks.*.ffn"``); None probes every MoE layer found.
        jacobian: compute the expert Jacobian spectra.
        layer_jacobian: compute the Jacobian through the router (the most expensive part).
        pca: compute the weighted PCA of the layer sites.
        alignment: compute the cross-expert Jacobian alignment.
        subspaces: compute the Grassmann distances between expert subspaces.
        dtype: ``"float64"`` (default) or ``"float32"``.
        memory_budget_bytes: peak memory of one Jacobian chunk.
        subspace_rank: ``r`` of the Grassmann subspaces.
        max_expert_keys: per-expert keys logged for at most this many experts per layer (aggregates always);
            None logs all. Keeps W&B well under its metric limits for models with many experts.
        log_media: also log histograms, tables and heatmaps where the logger supports them.
        input_key: which element of a batch is the model input (index or dict key).
        forward: ``forward(pl_module, inputs)`` used to run the model on the probe set; default
            ``pl_module(inputs)``.
        probe_config: extra :class:`~moe_lightning.geometry.ProbeConfig` fields (e.g. ``matrix_free_threshold``).
        save_reports: also write every probe's full reports (mean spectra, matrices, PCA eigenvalues) as
            ``geometry/step_<step>.json`` (:meth:`GeometryReport.to_dict` per layer) into ``report_dir``; this is
            what ``moe-lightning report`` plots from.
        report_dir: where ``geometry/`` goes; None uses the first CSV or TensorBoard logger's ``log_dir``, else
            the W&B run's files directory (so the reports travel with the W&B run); nothing is written when there
            is neither.
        callback_metrics: the keys also put into ``trainer.callback_metrics``: fnmatch patterns, for instance
            ``"geometry/*/jac_sigma_max/mean"``; None (default) every key but the per-expert ones; ``[]`` none.

    Example::

        trainer = Trainer(callbacks=[GeometryMonitor(every_n_steps=100, max_tokens=256)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        every_n_steps: int | None = 600,
        every_n_epochs: int | None = None,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        max_tokens: int = 256,
        min_tokens_per_expert: int | None = None,
        bootstrap: int = 0,
        source: str = "val",
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
        log_media: bool = True,
        input_key: str | int = 0,
        forward: Callable[[LightningModule, Any], Any] | None = None,
        probe_config: dict[str, Any] | None = None,
        save_reports: bool = True,
        report_dir: str | None = None,
        callback_metrics: str | list[str] | None = None,
    ) -> None:
        super().__init__("GeometryMonitor", callback_metrics)
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            check_positive_int(f"GeometryMonitor: {name}", value, allow_none=True)
        check_positive_int("GeometryMonitor: max_tokens", max_tokens)
        check_positive_int("GeometryMonitor: min_tokens_per_expert", min_tokens_per_expert, allow_none=True)
        check_choice("GeometryMonitor: source", source, _SOURCES)
        probe_dtype = dtype_from_name("GeometryMonitor: dtype", dtype, _PROBE_DTYPES)
        if max_expert_keys is not None and max_expert_keys < 0:
            raise ValueError(f"GeometryMonitor: max_expert_keys must be >= 0 or None, got {max_expert_keys!r}")
        self.schedule = Schedule(every_n_steps, at_fit_start, every_n_epochs, at_fit_end)
        self.max_tokens, self.source, self.layers = max_tokens, source, layers
        self.min_tokens_per_expert = min_tokens_per_expert
        self.max_expert_keys, self.log_media = max_expert_keys, log_media
        self.input_key, self.forward = input_key, forward
        self.save_reports, self.report_dir = save_reports, report_dir
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
        self.views: list[MoEView] = []
        # State kept across checkpoints: the probe set, the steps already probed, each layer's last logged step.
        self.probe_inputs: list[Any] | None = None
        self.logged_steps: dict[str, int] = {}
        self.last_reports: dict[str, GeometryReport] = {}
        self._failures = Failures("GeometryMonitor")
        self._incidents = LayerIncidents("GeometryMonitor")
        self._warned: set[str] = set()
        self.views_checked = False  # each layer's views are checked at the first probe (callbacks/_verify.py)

    @property
    def every_n_steps(self) -> int | None:
        return self.schedule.every_n_steps

    @property
    def probed_steps(self) -> list[int]:
        """The steps probed so far (kept in the checkpoint)."""
        return self.schedule.done

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:

        def find() -> None:
            define_step_metric(trainer, "geometry/*")
            self.views, self.views_checked = find_moe_layers(observed_model(pl_module), self.layers), False

        if not self._failures.run(trainer, "finding the MoE layers", find, "nothing will be probed"):
            self.views = []
        elif not self.views:
            patterns = "" if self.layers is None else f" matching {self.layers!r}"
            rank_zero_warn(
                f"GeometryMonitor: no MoE layers{patterns} found in {type(pl_module).__name__}; "
                "nothing will be probed (see moe_lightning.adapters.register_adapter)"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_inputs is None and self.views:

            def draw() -> None:
                self.probe_inputs = self._draw_probe_set(trainer, pl_module)

            if not self._failures.run(trainer, "drawing the probe set", draw, "nothing will be probed"):
                self.views, self.probe_inputs = [], None
        # Without a datamodule the probe set (and the baseline) comes from the first training batch instead.
        step = logging_step(trainer)
        if self.probe_inputs is not None and self.schedule.at_start(step):
            self.run_probe(trainer, pl_module, step)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe_inputs is None and self.views:  # no datamodule to draw from: take the first training batch

            def take() -> None:
                self.probe_inputs = [cpu_copy(batch_inputs(batch, self.input_key))]

            if not self._failures.run(trainer, "taking the probe set", take, "nothing will be probed"):
                self.views, self.probe_inputs = [], None
                return
            step = logging_step(trainer)
            if self.schedule.at_start(step):
                self.run_probe(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logging_step(trainer, after_batch=True)
        if self.schedule.after_batch(step):
            self.run_probe(trainer, pl_module, step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch_done = trainer.current_epoch + 1
        step = logging_step(trainer)
        if self.schedule.after_epoch(epoch_done, step):
            self.run_probe(trainer, pl_module, step)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank runs on_train_end, so the final probe's collectives meet as a scheduled probe's do.
        step = logging_step(trainer)
        if self.probe_inputs is not None and self.views and self.schedule.at_end(step):
            self.run_probe(trainer, pl_module, step)
        if self.views:
            last = {view.name: self.logged_steps.get(view.name) for view in self.views}
            warn_if_stale("GeometryMonitor", last, step, self.schedule)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_inputs": self.probe_inputs,
            "probed_steps": list(self.probed_steps),
            "logged_steps": dict(self.logged_steps),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_inputs = state_dict.get("probe_inputs")
        self.schedule.done = list(state_dict.get("probed_steps", []))
        self.logged_steps = dict(state_dict.get("logged_steps", {}))

    # ------------------------------------------------------------------ probe set
    def _draw_probe_set(self, trainer: Trainer, pl_module: LightningModule) -> list[Any] | None:
        """The probe set (:func:`~moe_lightning.callbacks._probe_set.draw_probe_set`) from the datamodule's
        loader, or None without one. Deterministic: the same data on every rank and every run; the model's state
        and the global RNG are restored afterwards."""
        loader = probe_loader(trainer.datamodule, self.source)
        if loader is None or not self.views:
            return None
        with observation(pl_module) as changes:
            inputs = draw_probe_set(
                loader,
                self.views,
                lambda batches: self._capture(trainer, pl_module, batches),
                self.input_key,
                self.max_tokens,
                self.min_tokens_per_expert,
            )
        warn_state_changes("GeometryMonitor", changes, self._warned)
        return inputs

    # ------------------------------------------------------------------ the probe
    def _capture(self, trainer: Trainer, pl_module: LightningModule, inputs: list[Any]) -> dict[str, Tensor]:
        """Each probed layer's inputs on ``inputs``, converted as the trainer converts a batch (a ``bf16-true``
        model gets bf16 inputs) and run in its precision's forward context, without autocast."""
        precision = trainer.precision_plugin
        inputs = [precision.convert_input(x) for x in inputs]
        device_type = pl_module.device.type
        with precision.forward_context(), torch.autocast(device_type=device_type, enabled=False):
            return capture_layer_inputs(pl_module, self.views, inputs, self.forward)

    def run_probe(
        self, trainer: Trainer, pl_module: LightningModule, step: int | None = None
    ) -> dict[str, GeometryReport]:
        """Probe every layer now and log the results at ``step`` (default: the current step of Lightning's
        logging axis). Returns the reports; a layer whose probe failed on any rank, whose weights hold NaN/Inf or
        whose every probe token reached it with NaN/Inf inputs has none."""
        step = logging_step(trainer) if step is None else step
        self.schedule.done.append(step)
        if not self.probe_inputs or not self.views:
            return {}
        reports: dict[str, GeometryReport] = {}
        probe_set_finite = finite_tensors(self.probe_inputs)
        with observation(pl_module) as changes:
            captured, capture_error = {}, None
            try:
                captured = self._capture(trainer, pl_module, self.probe_inputs)
            except Exception as caught:  # every rank still enters each layer's agreement below
                capture_error = caught
            drop_unverified_views(self, trainer, pl_module, captured, capture_error)
            for view in self.views:
                stats = self._probe_layer(trainer, pl_module, view, captured, capture_error)
                failures = self._failures.agree(trainer, stats if isinstance(stats, BaseException) else None)
                nonfinite, failures = split_failures(failures)
                self._incidents.weights(view.name, step, nonfinite)
                if failures:
                    lost = f"no values of {view.name!r} are logged at step {step}"
                    self._failures.report(trainer, "the probe", failures, lost)
                if failures or nonfinite:
                    continue
                reduce_fn = sum_over_ranks(trainer)
                report = finalize(stats if reduce_fn is None else stats.reduce(reduce_fn))
                self._incidents.inputs(view.name, step, report.nonfinite_tokens, report.total_tokens, probe_set_finite)
                if report.total_tokens:  # with no finite token every value would be NaN
                    reports[view.name] = report
        warn_state_changes("GeometryMonitor", changes, self._warned)
        self.last_reports = reports
        self.logged_steps.update(dict.fromkeys(reports, step))
        scalars: dict[str, float] = {}
        for name, report in reports.items():
            scalars.update(report.scalars(f"geometry/{name}", max_experts=self.max_expert_keys))
        self.publish(trainer, scalars)
        if trainer.is_global_zero:
            try:
                self._log(trainer, reports, scalars, step)
            except Exception as error:  # a logger that fails must not stop training either
                warn_once(f"GeometryMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)
        return reports

    def _probe_layer(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        view: MoEView,
        captured: dict[str, Tensor],
        capture_error: BaseException | None,
    ) -> Any:
        """This rank's statistics of one layer, or the exception that stopped them. Each rank probes its share of
        the tokens; under expert parallelism the ranks of an expert group probe their shares together, each with
        its own experts. Under FSDP2 the layer's weights are gathered while it is probed (a collective every rank
        enters, even one whose capture failed); under expert parallelism each rank's own experts, or all of them
        where a quantity needs the whole layer on one rank."""
        rank, world = trainer.global_rank, trainer.world_size
        placement, all_experts = expert_layout(view, self.probe_config)
        lend = placement.gather_all if placement is not None and all_experts else None
        try:
            with gathered(view.module, lend_experts=lend, root=pl_module):
                nonfinite = nonfinite_weights(view.module)  # named as weights, not as the tokens it would drop
                if nonfinite is not None:
                    return nonfinite
                if capture_error is not None:
                    return capture_error
                x = captured[view.name][: self.max_tokens]
                split = placement is not None and not all_experts
                ranks = dist.get_process_group_ranks(placement.group) if split else [rank]
                shard = torch.cat([x.tensor_split(world)[r] for r in ranks]) if world > 1 else x
                counts = bootstrap_columns(self.probe_config, x.reshape(-1, x.shape[-1]).shape[0], world, ranks)
                where = {"expert_group": placement.group, "local_experts": placement.local_experts} if split else {}
                return probe_statistics(view, shard, self.probe_config, resample_counts=counts, **where)
        except Exception as error:  # a probe must never stop training; agreed over ranks and reported
            return error

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Trainer, reports: dict[str, GeometryReport], scalars: dict[str, float], step: int) -> None:
        log_scalars(trainer, scalars, step)
        if self.save_reports and reports:
            try:
                save_geometry_reports(trainer, self.report_dir, reports, step, self.probe_config.dtype)
            except Exception as error:  # a full disk must not stop training either
                warn_once(f"GeometryMonitor: could not save reports: {error!r}", self._warned, rank_zero_warn)
        if self.log_media:
            try:
                log_geometry_media(trainer, reports, step)
            except Exception as error:  # media are a bonus; never let them stop training
                warn_once(f"GeometryMonitor: could not log media: {error!r}", self._warned, rank_zero_warn)
