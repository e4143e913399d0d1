"""CurvatureMonitor: extreme Hessian eigenvalues (Lanczos), trace (Hutchinson or Hutch++) and spectral density
(stochastic Lanczos quadrature) of the training loss, for the whole model and named parameter subsets
(docs/geometry.md §7)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from typing_extensions import override

from moe_lightning.adapters.capture import to_device
from moe_lightning.adapters.registry import uncompiled_name
from moe_lightning.callbacks._media import log_density_media
from moe_lightning.callbacks._observe import PublishingCallback, define_step_metric, log_scalars, logging_step, ranks_of
from moe_lightning.callbacks._reports import save_densities
from moe_lightning.common import check_choice, check_nonnegative, check_positive_int, observation, warn_once
from moe_lightning.geometry import SpectralDensity, hessian_eigenvalues, hessian_spectral_density, hessian_trace
from moe_lightning.geometry.curvature import TRACE_METHODS
from moe_lightning.geometry.stability import edge_of_stability
from moe_lightning.monitors.observe import warn_state_changes
from moe_lightning.monitors.probe_set import cpu_copy
from moe_lightning.monitors.ranks import Failures
from moe_lightning.monitors.schedule import Schedule, warn_if_stale

EIGEN_METHODS = ("lanczos",)


class CurvatureMonitor(PublishingCallback):
    """Loss curvature on a fixed batch, on its own schedule (heavier than the other monitors; off by default in
    the configs).

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
        if not (eigenvalue or trace):  # the density alone has no scalar to plot against the others
            raise ValueError("CurvatureMonitor: at least one of eigenvalue or trace must be True")
        check_choice("CurvatureMonitor: method", method, EIGEN_METHODS)
        check_choice("CurvatureMonitor: trace_method", trace_method, TRACE_METHODS)
        for field, value in (
            ("top_k", top_k),
            ("eigen_max_iter", eigen_max_iter),
            ("trace_max_samples", trace_max_samples),
            ("density_starts", density_starts),
            ("density_steps", density_steps),
            ("density_grid", density_grid),
        ):
            check_positive_int(f"CurvatureMonitor: {field}", value)
        check_nonnegative("CurvatureMonitor: eigen_tol", eigen_tol)
        check_nonnegative("CurvatureMonitor: trace_tol", trace_tol)
        groups = {name: [pat] if isinstance(pat, str) else list(pat) for name, pat in (param_groups or {}).items()}
        if not full_model and not groups:
            raise ValueError("CurvatureMonitor: full_model=False needs param_groups")
        self.schedule = Schedule(every_n_steps, at_fit_start, at_fit_end=at_fit_end)
        self.eigenvalue, self.trace, self.density = eigenvalue, trace, density
        self.method, self.top_k, self.both_ends = method, top_k, both_ends
        self.eigen_max_iter, self.eigen_tol = eigen_max_iter, eigen_tol
        self.trace_method, self.trace_max_samples, self.trace_tol = trace_method, trace_max_samples, trace_tol
        self.density_starts, self.density_steps, self.density_grid = density_starts, density_steps, density_grid
        self.param_groups, self.full_model = groups, full_model
        self.save_reports, self.report_dir = save_reports, report_dir
        self.loss_fn, self.seed = loss_fn, seed
        self.batch: Any = None
        self.last: dict[str, float] = {}
        self.last_densities: dict[str, SpectralDensity] = {}
        self.disabled = False
        self.logged_step: int | None = None
        self._failures = Failures("CurvatureMonitor")
        self._warned: set[str] = set()

    @property
    def every_n_steps(self) -> int | None:
        return self.schedule.every_n_steps

    @property
    def computed_steps(self) -> list[int]:
        """The steps computed so far (kept in the checkpoint)."""
        return self.schedule.done

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:

        def check() -> None:
            self._check_setup(trainer, pl_module)
            define_step_metric(trainer, "curvature/*")

        # a setup it cannot serve turns the monitor off, with one warning
        self.disabled = not self._failures.run(
            ranks_of(trainer), "setting up", check, "it computes nothing in this run"
        )

    def _check_setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, "loss", None)):
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
        self._parameter_sets(pl_module)  # a group that matches nothing fails now, not at the first probe

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.batch is None and not self.disabled:
            self.batch = cpu_copy(batch)
            step = logging_step(trainer)
            if self.schedule.at_start(step):
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

    def _parameter_sets(self, pl_module: LightningModule) -> dict[str, list[Tensor]]:
        """``{metric prefix: parameters}``: all trainable parameters, then each group's."""
        named = [(uncompiled_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad]
        sets = {"curvature": [p for _, p in named]} if self.full_model else {}
        for name, patterns in self.param_groups.items():
            chosen = [p for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
            if not chosen:
                raise ValueError(
                    f"param_groups[{name!r}]={patterns!r} matches no trainable parameter; "
                    f"names look like {[n for n, _ in named[:4]]}"
                )
            sets[f"curvature/{name}"] = chosen
        return sets

    def compute(self, trainer: Trainer, pl_module: LightningModule, step: int | None = None) -> dict[str, float]:
        """Compute and log the curvature now, at ``step`` (default: the current step of Lightning's logging
        axis); returns the logged values (none when it failed on any rank)."""
        step = logging_step(trainer) if step is None else step
        self.schedule.done.append(step)
        local_error: list[BaseException] = []  # this rank's first failure, which the others may only see as NaN

        def loss() -> Tensor:
            try:
                if self.loss_fn is not None:
                    return self.loss_fn(pl_module, batch)
                out = pl_module.loss(batch)
                return out[0] if isinstance(out, tuple) else out
            except Exception as error:
                local_error.append(error)
                raise

        reduce = (
            {"all_reduce": dist.all_reduce, "world_size": trainer.world_size} if ranks_of(trainer).distributed else {}
        )
        metrics: dict[str, float] = {}
        densities: dict[str, SpectralDensity] = {}
        notes: list[str] = []
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        try:
            batch = to_device(self.batch, pl_module.device)
            # Double backward needs the math attention kernel: the fused CPU/CUDA kernels have no second derivative.
            with observation(pl_module, grad=True) as changes, sdpa_kernel([SDPBackend.MATH]):
                for prefix, params in self._parameter_sets(pl_module).items():
                    args = (loss, params, reduce)
                    if self.eigenvalue:
                        metrics.update(self._quantity(notes, prefix, "eigenvalues", self._eigen_metrics, *args))
                        eos = partial(self._stability_metrics, optimizer)
                        metrics.update(self._quantity(notes, prefix, "stability", eos, *args))
                    if self.trace:
                        metrics.update(self._quantity(notes, prefix, "trace", self._trace_metrics, *args))
                    if self.density:
                        found = self._quantity(notes, prefix, "density", self._density, *args)
                        if found:
                            densities[prefix] = found["density"]
            warn_state_changes("CurvatureMonitor", changes, self._warned)
        except Exception as error:
            local_error.append(error)
        failures = self._failures.agree(ranks_of(trainer), local_error[0] if local_error else None)
        if failures:
            self._failures.report(ranks_of(trainer), "the curvature", failures, f"no values are logged at step {step}")
            metrics, densities = {}, {}
        for note in notes if not failures else ():
            warn_once(note, self._warned, rank_zero_warn)
        self.last, self.last_densities = metrics, densities
        self.logged_step = step if metrics else self.logged_step
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

    def _quantity(self, notes: list[str], prefix: str, what: str, fn: Callable, *args: Any) -> dict[str, Any]:
        """``fn(prefix, *args)``, or nothing and a note for the warning when its products hold NaN/Inf (training
        goes on; none of its values are logged then); any other error goes up to :meth:`compute`, which
        agrees on it over the ranks."""
        try:
            out = fn(prefix, *args)
        except FloatingPointError as error:
            out = {}
            notes.append(f"CurvatureMonitor: {prefix} {what} skipped: {error}")
        # a NaN standard error only says too few samples were drawn; the values themselves must be finite
        bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v) and "std_error" not in k]
        if bad:
            notes.append(f"CurvatureMonitor: {prefix} {what} is not finite ({bad}); it is not logged")
            return {}
        return out

    def _eigen_metrics(self, p: str, loss: Callable, params: list[Tensor], reduce: dict) -> dict[str, float]:
        which = "both" if self.both_ends else "largest"
        res = hessian_eigenvalues(
            loss,
            params,
            k=self.top_k,
            which=which,
            max_iter=self.eigen_max_iter,
            tol=self.eigen_tol,
            seed=self.seed,
            **reduce,
        )
        values, residuals = res.eigenvalues.tolist(), res.residuals.tolist()
        top = min(self.top_k, len(values))
        out: dict[str, float] = {}
        for i in range(top):
            out[f"{p}/hessian_eigenvalue/{i}"] = values[i]
            out[f"{p}/hessian_eigenvalue_residual/{i}"] = residuals[i]
        if self.both_ends:
            # "both" returns the top block descending, then the bottom block ascending (none if the basis is tiny)
            low = top if len(values) > top else top - 1
            out[f"{p}/hessian_lambda_min"] = values[low]
            out[f"{p}/hessian_lambda_min_residual"] = residuals[low]
        out[f"{p}/hessian_top_eigenvalue"] = max(values, key=abs)
        out[f"{p}/hessian_top_iterations"] = float(res.iterations)
        out[f"{p}/hessian_top_converged"] = float(res.all_converged)
        return out

    def _stability_metrics(
        self, optimizer: Any, p: str, loss: Callable, params: list[Tensor], reduce: dict
    ) -> dict[str, float]:
        found = edge_of_stability(
            optimizer, loss, params, max_iter=self.eigen_max_iter, tol=self.eigen_tol, seed=self.seed, **reduce
        )
        return {f"{p}/{key}": value for key, value in found.items()}

    def _trace_metrics(self, p: str, loss: Callable, params: list[Tensor], reduce: dict) -> dict[str, float]:
        tr = hessian_trace(
            loss,
            params,
            method=self.trace_method,
            num_matvecs=self.trace_max_samples,
            tol=self.trace_tol,
            seed=self.seed,
            **reduce,
        )
        return {
            f"{p}/hessian_trace": tr.trace,
            f"{p}/hessian_trace_std_error": tr.std_error,
            f"{p}/hessian_trace_samples": float(tr.iterations),
        }

    def _density(self, p: str, loss: Callable, params: list[Tensor], reduce: dict) -> dict[str, SpectralDensity]:
        dens = hessian_spectral_density(
            loss,
            params,
            num_starts=self.density_starts,
            num_steps=self.density_steps,
            grid_size=self.density_grid,
            seed=self.seed,
            **reduce,
        )
        return {"density": dens}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "computed_steps": list(self.computed_steps), "logged_step": self.logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch = state_dict.get("batch")
        self.schedule.done = list(state_dict.get("computed_steps", []))
        self.logged_step = state_dict.get("logged_step")
