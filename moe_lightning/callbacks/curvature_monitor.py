"""CurvatureMonitor: extreme Hessian eigenvalues (Lanczos), trace (Hutchinson or Hutch++) and spectral density
(stochastic Lanczos quadrature) of the training loss, for the whole model and named parameter subsets
(docs/geometry.md §7)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from moe_lightning.callbacks._media import log_density_media
from moe_lightning.callbacks._observe import PublishingCallback, define_step_metric, log_scalars, logging_step, ranks_of
from moe_lightning.callbacks._reports import save_densities
from moe_lightning.common import check_positive_int, warn_once
from moe_lightning.geometry import SpectralDensity
from moe_lightning.monitors.curvature_probe import CurvatureProbe
from moe_lightning.monitors.schedule import Schedule, warn_if_stale


class CurvatureMonitor(PublishingCallback):
    """Loss curvature on a fixed batch, on its own schedule (heavier than the other monitors; off by default in
    the configs).

    A thin wrapper around :class:`~moe_lightning.monitors.CurvatureProbe`, the loop-agnostic core.

    The batch is the first training batch of each rank (kept in the callback's state, so a resumed run uses the
    same one). Hessian-vector products use double backward through ``torch.autograd.grad`` on the module's own
    loss, with the gradient graph built once per quantity, so ``.grad`` buffers are never touched; modes, buffers
    and RNG states are restored, and a compiled module runs eagerly. Under DDP each rank differentiates its own
    batch shard and every product is averaged with one all-reduce, so the values are those of one process on the
    union of the shards. A failure on any rank (or a strategy it does not support) becomes one warning, and
    training goes on. Steps and ``trainer.callback_metrics`` as for :class:`GeometryMonitor`.

    Logged metrics (``<p>`` is ``curvature`` for all trainable parameters, ``curvature/<name>`` per group):
        - ``<p>/hessian_top_eigenvalue`` (largest ``|λ|`` of those computed), ``<p>/hessian_eigenvalue/<i>`` and
          ``<p>/hessian_eigenvalue_residual/<i>`` for the ``top_k`` largest, with ``both_ends`` also
          ``<p>/hessian_lambda_min`` and ``<p>/hessian_lambda_min_residual``; ``<p>/hessian_top_iterations``
          (Hessian-vector products), ``<p>/hessian_top_converged``;
        - with ``eigenvalue``, the edge-of-stability threshold of the optimiser (moe_lightning/geometry/stability.py),
          from its own ``param_groups`` and state at the step: for ``torch.optim.SGD``
          ``<p>/sgd_stability_threshold`` (``(2 + 2μ)/η``, plain ``2/η``); for Adam/AdamW
          ``<p>/preconditioned_top_eigenvalue`` (``λ₁(P⁻¹H)``), ``<p>/preconditioned_top_converged`` and
          ``<p>/adam_stability_threshold`` (``(2 + 2β₁)/((1 − β₁)η)``). None of them for other optimisers, several
          optimisers, differing hyperparameters across the groups or Adam before its first step (no state);
        - ``<p>/hessian_trace``, ``<p>/hessian_trace_std_error``, ``<p>/hessian_trace_samples`` (Hutch++: products
          spent; Hutchinson: samples);
        - with ``density``: ``<p>/hessian_density`` as a W&B histogram and a TensorBoard histogram (expected
          eigenvalue counts per grid cell), a ``curvature/density`` W&B table, and ``curvature/step_<step>.json``
          (grid, density, quadrature nodes and weights) in ``report_dir``.

    Args:
        every_n_steps: compute when ``trainer.global_step`` is a multiple of this.
        at_fit_start: also compute at the first training batch (the initialisation baseline).
        at_fit_end: also compute when training ends, at its last step, unless that step was computed already; when
            the last values lie far from the last step all the same, a warning says so.
        eigenvalue: compute the extreme eigenvalues.
        trace: compute the trace.
        method: ``lanczos``, the only eigenvalue method.
        top_k: largest eigenvalues wanted.
        both_ends: also the smallest (most negative) eigenvalue.
        eigen_max_iter: most Lanczos steps (the Krylov basis size).
        eigen_tol: residual tolerance ``‖H y − θ y‖ ≤ tol · |θ|`` per eigenvalue.
        trace_method: ``hutchinson`` (default: at the monitor's budget it had the lower variance on both tiny
            configs, docs/benchmarks/curvature.md) or ``hutchpp`` (better for a fast-decaying spectrum).
        trace_max_samples: Hutch++: products spent; Hutchinson: most samples.
        trace_tol: Hutchinson: stop when the standard error is below ``trace_tol * |trace|``.
        density: compute the spectral density by stochastic Lanczos quadrature.
        density_starts: random starts of the density.
        density_steps: Lanczos steps per start.
        density_grid: grid points of the density.
        param_groups: ``{name: pattern or patterns}``; each group's Hessian (of its parameters, fnmatch against
            ``named_parameters()`` names) is measured too and logged under ``curvature/<name>/...``.
        full_model: also measure all trainable parameters together (under ``curvature/...``).
        save_reports: write the densities as JSON into ``report_dir``.
        report_dir: where ``curvature/`` goes; None uses the first CSV or TensorBoard logger's ``log_dir``, else the
            W&B run's files directory (next to ``GeometryMonitor``'s ``geometry/``).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar``; default ``pl_module.loss(batch)``.
        seed: seed of the random vectors (a local generator; the global RNG is untouched).
        callback_metrics: the keys also put into ``trainer.callback_metrics``: fnmatch patterns; None (default)
            every key; ``[]`` none.

    Example::

        trainer = Trainer(callbacks=[CurvatureMonitor(every_n_steps=500, param_groups={"router": "*router*"})])
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        eigenvalue: bool = True,
        trace: bool = True,
        eigen_max_iter: int = 30,
        eigen_tol: float = 1e-3,
        trace_max_samples: int = 30,
        trace_tol: float = 1e-2,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
        method: str = "lanczos",
        top_k: int = 1,
        both_ends: bool = True,
        trace_method: str = "hutchinson",
        density: bool = True,
        density_starts: int = 2,
        density_steps: int = 30,
        density_grid: int = 101,
        param_groups: dict[str, str | Sequence[str]] | None = None,
        full_model: bool = True,
        save_reports: bool = True,
        report_dir: str | None = None,
        callback_metrics: str | list[str] | None = None,
    ) -> None:
        super().__init__("CurvatureMonitor", callback_metrics)
        check_positive_int("CurvatureMonitor: every_n_steps", every_n_steps)
        # The schedule, the batch, the computation and its state live in the loop-agnostic core (monitors/).
        self.core = CurvatureProbe(
            every_n_steps,
            at_fit_start,
            at_fit_end,
            eigenvalue,
            trace,
            eigen_max_iter,
            eigen_tol,
            trace_max_samples,
            trace_tol,
            loss_fn,
            seed,
            method,
            top_k,
            both_ends,
            trace_method,
            density,
            density_starts,
            density_steps,
            density_grid,
            param_groups,
            full_model,
            name="CurvatureMonitor",
        )
        self.save_reports, self.report_dir = save_reports, report_dir
        self._warned: set[str] = set()

    @property
    def schedule(self) -> Schedule:
        return self.core.schedule

    @property
    def every_n_steps(self) -> int | None:
        return self.schedule.every_n_steps

    @property
    def computed_steps(self) -> list[int]:
        """The steps computed so far (kept in the checkpoint)."""
        return self.schedule.done

    @property
    def batch(self) -> Any:
        """The fixed batch (kept in the checkpoint)."""
        return self.core.batch

    @batch.setter
    def batch(self, batch: Any) -> None:
        self.core.batch = batch

    @property
    def disabled(self) -> bool:
        return self.core.disabled

    @property
    def last(self) -> dict[str, float]:
        return self.core.last

    @property
    def last_densities(self) -> dict[str, SpectralDensity]:
        return self.core.last_densities

    @property
    def logged_step(self) -> int | None:
        return self.core.logged_step

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:

        def prepare() -> None:
            self._check_setup(trainer, pl_module)
            define_step_metric(trainer, "curvature/*")

        # a setup it cannot serve turns the monitor off, with one warning
        self.core.setup(pl_module, ranks_of(trainer), prepare)

    def _check_setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.core.loss_fn is None and not callable(getattr(pl_module, "loss", None)):
            raise ValueError(
                f"{type(pl_module).__name__} has no loss(batch) method; "
                "pass loss_fn=lambda module, batch: <scalar loss>"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            # Its Hessian-vector products differentiate through the weights twice, which FSDP2's sharded
            # parameters and the expert exchange are not built for.
            raise ValueError(
                "strategy ModelParallelStrategy (FSDP2, expert parallelism) is not supported; "
                "allowed: single-device and DDP strategies"
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.batch is None and not self.disabled:  # each rank's first training batch
            self.core.take_batch(pl_module, batch, ranks_of(trainer), baseline=False)
            step = logging_step(trainer)
            if self.batch is not None and self.schedule.at_start(step):
                self.compute(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logging_step(trainer, after_batch=True)
        if not self.disabled and self.schedule.after_batch(step):
            self.compute(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every rank runs on_train_end, so the products' all-reduces meet as a scheduled computation's do
        step = logging_step(trainer)
        if self.disabled or self.batch is None:
            return
        if self.schedule.at_end(step):
            self.compute(trainer, pl_module, step)
        warn_if_stale("CurvatureMonitor", {"curvature": self.logged_step}, step, self.schedule, "computation")

    def compute(self, trainer: Trainer, pl_module: LightningModule, step: int | None = None) -> dict[str, float]:
        """Compute and log the curvature now, at ``step`` (default: the current step of Lightning's logging
        axis); returns the logged values (none when it failed on any rank)."""
        step = logging_step(trainer) if step is None else step
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        metrics = self.core.compute(pl_module, step, ranks_of(trainer), optimizer)
        densities = self.core.last_densities
        self.publish(trainer, metrics)
        try:
            log_scalars(trainer, metrics, step)
            if densities and trainer.is_global_zero:
                if self.save_reports:
                    save_densities(trainer, self.report_dir, densities, step)
                log_density_media(trainer, densities, step)
        except Exception as error:  # media, files and loggers are a bonus; never let them stop training
            warn_once(f"CurvatureMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
