"""GeometryMonitor: Jacobian spectra, weighted PCA, alignment and Grassmann distances of every MoE layer,
probed on a fixed token set over the course of training (docs/geometry.md §1-5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from moe_lightning.callbacks._media import log_geometry_media
from moe_lightning.callbacks._observe import (
    PublishingCallback,
    define_step_metric,
    log_scalars,
    logging_step,
    observed_model,
    ranks_of,
)
from moe_lightning.callbacks._reports import save_geometry_reports
from moe_lightning.common import check_choice, warn_once
from moe_lightning.geometry import GeometryReport, MoEView, ProbeConfig
from moe_lightning.monitors.geometry_probe import GeometryProbe
from moe_lightning.monitors.probe_set import probe_loader
from moe_lightning.monitors.schedule import Schedule, warn_if_stale

_SOURCES = ("val", "train")


class GeometryMonitor(PublishingCallback):
    r"""Probe the local function geometry and the representation geometry of every MoE layer during training.

    A thin wrapper around :class:`~moe_lightning.monitors.GeometryProbe`, the loop-agnostic core.

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
          ``cka_*`` (linear CKA of the experts' outputs), ``subspace_*``, ``nonfinite_tokens``, ``empty_experts``;
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
        background: compute each probe beside training, in a forked copy of the process at the lowest CPU priority:
            the step only captures the layers' inputs, and the values, which describe the weights of the step they
            are logged at, arrive a few steps later (into ``callback_metrics`` too). Linux, a model on the CPU, and
            not FSDP2 or expert parallelism; elsewhere the probe runs in the step, with one warning saying why. The
            final probe runs in the step. See docs/callbacks.md, "Probing beside training".
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
        background: bool = False,
        save_reports: bool = True,
        report_dir: str | None = None,
        callback_metrics: str | list[str] | None = None,
    ) -> None:
        super().__init__("GeometryMonitor", callback_metrics)
        check_choice("GeometryMonitor: source", source, _SOURCES)
        # The schedule, the probe set, the probe and its state live in the loop-agnostic core (monitors/).
        self.core = GeometryProbe(
            every_n_steps,
            every_n_epochs,
            at_fit_start,
            at_fit_end,
            max_tokens,
            min_tokens_per_expert,
            bootstrap,
            layers,
            jacobian,
            layer_jacobian,
            pca,
            alignment,
            subspaces,
            dtype,
            memory_budget_bytes,
            subspace_rank,
            max_expert_keys,
            input_key,
            forward,
            probe_config,
            background,
            name="GeometryMonitor",
        )
        self.source, self.log_media = source, log_media
        self.save_reports, self.report_dir = save_reports, report_dir
        self._warned: set[str] = set()

    @property
    def schedule(self) -> Schedule:
        return self.core.schedule

    @property
    def probe_config(self) -> ProbeConfig:
        return self.core.probe_config

    @property
    def views(self) -> list[MoEView]:
        return self.core.views or []

    @property
    def views_checked(self) -> bool:
        return self.core.views_checked

    @property
    def probe_inputs(self) -> list[Any] | None:
        """The probe set (kept in the checkpoint)."""
        return self.core.probe_inputs

    @property
    def logged_steps(self) -> dict[str, int]:
        """Each layer's last logged step (kept in the checkpoint)."""
        return self.core.logged_steps

    @property
    def last_reports(self) -> dict[str, GeometryReport]:
        return self.core.last_reports

    @property
    def every_n_steps(self) -> int | None:
        return self.schedule.every_n_steps

    @property
    def probed_steps(self) -> list[int]:
        """The steps probed so far (kept in the checkpoint)."""
        return self.schedule.done

    # ------------------------------------------------------------------ Lightning hooks
    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand the core the trainer's precision: the probe set is converted and run as the trainer runs a batch
        (a ``bf16-true`` model gets bf16 inputs), in its precision's forward context."""
        precision = trainer.precision_plugin
        self.core.convert_input, self.core.forward_context = precision.convert_input, precision.forward_context
        self.core.on_delivery = lambda step, reports, scalars: self._deliver(trainer, reports, scalars, step)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._attach(trainer, pl_module)
        model = observed_model(pl_module)
        prepare = lambda: define_step_metric(trainer, "geometry/*")  # noqa: E731
        self.core.find_layers(model, ranks_of(trainer), prepare, model_name=type(pl_module).__name__)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)
        ranks = ranks_of(trainer)
        self.core.draw_probe_set(pl_module, probe_loader(trainer.datamodule, self.source), ranks)
        # Without a datamodule the probe set (and the baseline) comes from the first training batch instead.
        step = logging_step(trainer)
        if self.probe_inputs is not None and self.schedule.at_start(step):
            self.run_probe(trainer, pl_module, step)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe_inputs is None and self.views:  # no datamodule to draw from: take the first training batch
            self.core.take_probe_set(pl_module, batch, ranks_of(trainer), baseline=False)
            step = logging_step(trainer)
            if self.probe_inputs is not None and self.schedule.at_start(step):
                self.run_probe(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.core.beside.in_flight is not None:  # a probe computed beside training may have finished
            self.core.poll(ranks_of(trainer))
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
        self._attach(trainer, pl_module)
        self.core.finish(ranks_of(trainer))
        if self.probe_inputs is not None and self.views and self.schedule.at_end(step):
            self.run_probe(trainer, pl_module, step, wait=True)
        if self.views:
            last = {view.name: self.logged_steps.get(view.name) for view in self.views}
            warn_if_stale("GeometryMonitor", last, step, self.schedule)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.core.close()  # training stopped: a probe still computed beside it is not delivered

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.core.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)

    # ------------------------------------------------------------------ the probe
    def run_probe(
        self, trainer: Trainer, pl_module: LightningModule, step: int | None = None, wait: bool = False
    ) -> dict[str, GeometryReport]:
        """Probe every layer now and log the results at ``step`` (default: the current step of Lightning's
        logging axis). Returns the reports; a layer whose probe failed on any rank, whose weights hold NaN/Inf or
        whose every probe token reached it with NaN/Inf inputs has none. With ``background`` (and not ``wait``)
        the probe is computed beside training: it returns no reports, and the values are logged at ``step`` when
        they are ready."""
        step = logging_step(trainer) if step is None else step
        if not self.probe_inputs or not self.views:
            self.schedule.done.append(step)
            return {}
        self._attach(trainer, pl_module)
        return self.core.probe(pl_module, step, ranks_of(trainer), wait=wait)

    def _deliver(
        self, trainer: Trainer, reports: dict[str, GeometryReport], scalars: dict[str, float], step: int
    ) -> None:
        """A finished probe's values into ``callback_metrics`` and, on rank zero, to the loggers."""
        self.publish(trainer, scalars)
        if trainer.is_global_zero:
            try:
                self._log(trainer, reports, scalars, step)
            except Exception as error:  # a logger that fails must not stop training either
                warn_once(f"GeometryMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)

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
