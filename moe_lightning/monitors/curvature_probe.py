"""CurvatureProbe: the loop-agnostic core of the curvature monitor. Extreme Hessian eigenvalues (Lanczos), trace
(Hutchinson or Hutch++), spectral density (stochastic Lanczos quadrature) and the optimiser's edge-of-stability
threshold of the training loss on a fixed batch, for the whole model and named parameter subsets (docs/geometry.md
§7), from any training loop: Lightning's (``CurvatureMonitor``), the Hugging Face Trainer's, an Accelerate loop or a
plain one (docs/without-lightning.md)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_lightning.adapters.capture import to_device
from moe_lightning.adapters.registry import uncompiled_name
from moe_lightning.common import check_choice, check_nonnegative, check_positive_int, observation, warn_once
from moe_lightning.geometry import SpectralDensity, hessian_eigenvalues, hessian_spectral_density, hessian_trace
from moe_lightning.geometry.curvature import TRACE_METHODS
from moe_lightning.geometry.stability import edge_of_stability
from moe_lightning.monitors.curvature_inputs import check_model_loss, model_loss, torch_optimizer
from moe_lightning.monitors.geometry_probe import Log
from moe_lightning.monitors.observe import warn_state_changes
from moe_lightning.monitors.probe_set import cpu_copy, model_device
from moe_lightning.monitors.ranks import Failures, Ranks, rank_zero_warn
from moe_lightning.monitors.schedule import Schedule, warn_if_stale

EIGEN_METHODS = ("lanczos",)
LossFn = Callable[[nn.Module, Any], Tensor]


class CurvatureProbe:
    """Measure the curvature of the training loss on a fixed batch, on its own schedule, from any loop.

    The batch, taken once (:meth:`take_batch`), is kept in :meth:`state_dict`, so a resumed run measures on the same
    one. Call the probe after each optimiser step with the number of steps taken (``probe(model, step)``); at the
    steps of its schedule it computes the Hessian quantities of ``loss_fn(model, batch)``, hands them to ``log`` on
    rank zero and returns them. Hessian-vector products use double backward through ``torch.autograd.grad``, with
    the gradient graph built once per quantity, so ``.grad`` buffers are never touched; modes, buffers and RNG
    states are restored, the global RNG is untouched (the random vectors come from a local generator), and a
    compiled model runs eagerly. Under ``torch.distributed`` each rank differentiates its own batch and every
    product is averaged with one all-reduce, so the values are those of one process on the union of the batches
    (the same batch on every rank gives that batch's values). A failure on any rank becomes one warning, and
    training goes on; a quantity whose products hold NaN/Inf is not logged, with one warning. The keys are those of
    ``CurvatureMonitor`` (docs/callbacks.md).

    Args:
        every_n_steps: compute when the step is a multiple of this; None disables.
        at_start: compute once when the batch is taken (the initialisation baseline).
        at_end: compute once in :meth:`end`, at the last step, unless that step was computed already.
        eigenvalue: compute the extreme eigenvalues and the optimiser's stability threshold.
        trace: compute the trace.
        eigen_max_iter: most Lanczos steps (the Krylov basis size).
        eigen_tol: residual tolerance ``‖H y − θ y‖ ≤ tol · |θ|`` per eigenvalue.
        trace_max_samples: Hutch++: products spent; Hutchinson: most samples.
        trace_tol: Hutchinson: stop when the standard error is below ``trace_tol * |trace|``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`model_loss` (``model.loss(batch)``, or a
            Hugging Face model's ``model(**batch).loss``).
        seed: seed of the random vectors (a local generator; the global RNG is untouched).
        method: ``lanczos``, the only eigenvalue method.
        top_k: largest eigenvalues wanted.
        both_ends: also the smallest (most negative) eigenvalue.
        trace_method: ``hutchinson`` or ``hutchpp``.
        density: compute the spectral density by stochastic Lanczos quadrature (in :attr:`last_densities`; the
            loops' loggers take scalars, so it is not among the returned values).
        density_starts: random starts of the density.
        density_steps: Lanczos steps per start.
        density_grid: grid points of the density.
        param_groups: ``{name: pattern or patterns}``; each group's Hessian (of its parameters, fnmatch against
            ``named_parameters()`` names) is measured too and logged under ``curvature/<name>/...``.
        full_model: also measure all trainable parameters together (under ``curvature/...``).
        log: ``log(values, step)``, called on rank zero with every computation's scalars (``wandb.log``-like).
        name: the name the warnings and errors begin with.

    Example::

        curvature = CurvatureProbe(every_n_steps=500, log=lambda values, step: wandb.log(values, step=step))
        curvature.take_batch(model, next(iter(loader)))
        for step, batch in enumerate(loader, start=1):
            train_step(model, batch)
            curvature(model, step, optimizer=optimizer)
        curvature.end(model, step, optimizer=optimizer)
    """

    def __init__(
        self,
        every_n_steps: int | None = 500,
        at_start: bool = True,
        at_end: bool = True,
        eigenvalue: bool = True,
        trace: bool = True,
        eigen_max_iter: int = 30,
        eigen_tol: float = 1e-3,
        trace_max_samples: int = 30,
        trace_tol: float = 1e-2,
        loss_fn: LossFn | None = None,
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
        log: Log | None = None,
        name: str = "CurvatureProbe",
    ) -> None:
        check_positive_int(f"{name}: every_n_steps", every_n_steps, allow_none=True)
        if not (eigenvalue or trace):  # the density alone has no scalar to plot against the others
            raise ValueError(f"{name}: at least one of eigenvalue or trace must be True")
        check_choice(f"{name}: method", method, EIGEN_METHODS)
        check_choice(f"{name}: trace_method", trace_method, TRACE_METHODS)
        for field, value in (
            ("top_k", top_k),
            ("eigen_max_iter", eigen_max_iter),
            ("trace_max_samples", trace_max_samples),
            ("density_starts", density_starts),
            ("density_steps", density_steps),
            ("density_grid", density_grid),
        ):
            check_positive_int(f"{name}: {field}", value)
        check_nonnegative(f"{name}: eigen_tol", eigen_tol)
        check_nonnegative(f"{name}: trace_tol", trace_tol)
        groups = {key: [pat] if isinstance(pat, str) else list(pat) for key, pat in (param_groups or {}).items()}
        if not full_model and not groups:
            raise ValueError(f"{name}: full_model=False needs param_groups")
        self.name, self.log = name, log
        self.schedule = Schedule(every_n_steps, at_start, at_fit_end=at_end)
        self.eigenvalue, self.trace, self.density = eigenvalue, trace, density
        self.method, self.top_k, self.both_ends = method, top_k, both_ends
        self.eigen_max_iter, self.eigen_tol = eigen_max_iter, eigen_tol
        self.trace_method, self.trace_max_samples, self.trace_tol = trace_method, trace_max_samples, trace_tol
        self.density_starts, self.density_steps, self.density_grid = density_starts, density_steps, density_grid
        self.param_groups, self.full_model = groups, full_model
        self.loss_fn, self.seed = loss_fn, seed
        # State kept across checkpoints: the batch, the steps computed, the step of the last logged values.
        self.batch: Any = None
        self.logged_step: int | None = None
        self.last: dict[str, float] = {}
        self.last_densities: dict[str, SpectralDensity] = {}
        self.disabled = False  # a set-up it cannot serve turns it off for the run, with one warning
        self._failures = Failures(name)
        self._warned: set[str] = set()

    @property
    def computed_steps(self) -> list[int]:
        """The steps computed so far (kept in :meth:`state_dict`)."""
        return self.schedule.done

    # ------------------------------------------------------------------ the loop's calls
    def __call__(
        self, model: nn.Module, step: int, ranks: Ranks | None = None, optimizer: Any = None
    ) -> dict[str, float]:
        """After the optimiser step that made ``step`` steps: compute if the schedule says so. ``optimizer`` (the
        one that trains the model, wrapped or not) gives the edge-of-stability keys. Returns the values logged now,
        empty when there was no computation. Every rank calls it."""
        if self.disabled or self.batch is None or not self.schedule.after_batch(step):
            return {}
        return self.compute(model, step, ranks, optimizer)

    def end(self, model: nn.Module, step: int, ranks: Ranks | None = None, optimizer: Any = None) -> dict[str, float]:
        """When training ends at ``step``: the final computation (``at_end``), then a warning if the last values lie
        far from ``step``. Returns the values logged now. Every rank calls it."""
        if self.disabled or self.batch is None:
            return {}
        values = self.compute(model, step, ranks, optimizer) if self.schedule.at_end(step) else {}
        warn_if_stale(self.name, {"curvature": self.logged_step}, step, self.schedule, "computation")
        return values

    def setup(self, model: nn.Module, ranks: Ranks | None = None, prepare: Callable[[], Any] | None = None) -> None:
        """Check that ``model`` can be served (``prepare()`` first, if given): every parameter group matches a
        trainable parameter. A failure on any rank turns the probe off for the run, with one warning. A
        collective."""
        ranks = ranks or Ranks.current()

        def check() -> None:
            if prepare is not None:
                prepare()
            self.parameter_sets(model)  # a group that matches nothing fails now, not at the first computation

        self.disabled = not self._failures.run(ranks, "setting up", check, "it computes nothing in this run")

    def take_batch(
        self,
        model: nn.Module,
        batch: Any,
        ranks: Ranks | None = None,
        step: int = 0,
        broadcast: bool = False,
        baseline: bool = True,
        optimizer: Any = None,
    ) -> dict[str, float]:
        """Keep a CPU copy of ``batch`` (the whole batch: the loss needs its targets), if there is none yet (a
        restored one is kept), and with ``baseline`` compute the baseline at ``step`` if the schedule asks for one.
        With ``broadcast``, rank zero's batch is every rank's. Returns the values logged now. A collective."""
        ranks = ranks or Ranks.current()
        if self.batch is not None or self.disabled:
            return {}

        def take() -> None:
            if batch is None:
                raise ValueError("no batch to measure on")
            if self.loss_fn is None:  # said now, not at every step
                check_model_loss(model, batch)
            kept = cpu_copy(batch)
            if broadcast and ranks.distributed:
                holder = [kept]
                dist.broadcast_object_list(holder, src=0)
                kept = holder[0]
            self.batch = kept

        if not self._failures.run(ranks, "taking the batch", take, "it computes nothing in this run"):
            self.disabled, self.batch = True, None
            return {}
        return self.compute(model, step, ranks, optimizer) if baseline and self.schedule.at_start(step) else {}

    # ------------------------------------------------------------------ the computation
    def parameter_sets(self, model: nn.Module) -> dict[str, list[Tensor]]:
        """``{metric prefix: parameters}``: all trainable parameters, then each group's."""
        named = [(uncompiled_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        sets = {"curvature": [p for _, p in named]} if self.full_model else {}
        for group, patterns in self.param_groups.items():
            chosen = [p for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
            if not chosen:
                raise ValueError(
                    f"param_groups[{group!r}]={patterns!r} matches no trainable parameter; "
                    f"names look like {[n for n, _ in named[:4]]}"
                )
            sets[f"curvature/{group}"] = chosen
        return sets

    def compute(
        self, model: nn.Module, step: int, ranks: Ranks | None = None, optimizer: Any = None
    ) -> dict[str, float]:
        """Compute the curvature now, at ``step``, whatever the schedule; hand the scalars to ``log`` (rank zero)
        and return them (none when it failed on any rank). The densities go to :attr:`last_densities`. A
        collective: every rank calls it."""
        ranks = ranks or Ranks.current()
        self.schedule.done.append(step)
        local_error: list[BaseException] = []  # this rank's first failure, which the others may only see as NaN
        loss_fn = self.loss_fn or model_loss

        def loss() -> Tensor:
            try:
                return loss_fn(model, batch)
            except Exception as error:
                local_error.append(error)
                raise

        reduce = {"all_reduce": dist.all_reduce, "world_size": ranks.world_size} if ranks.distributed else {}
        metrics: dict[str, float] = {}
        densities: dict[str, SpectralDensity] = {}
        notes: list[str] = []
        optimizer = torch_optimizer(optimizer)
        try:
            batch = to_device(self.batch, model_device(model))
            # Double backward needs the math attention kernel: the fused CPU/CUDA kernels have no second derivative.
            with observation(model, grad=True) as changes, sdpa_kernel([SDPBackend.MATH]):
                for prefix, params in self.parameter_sets(model).items():
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
            warn_state_changes(self.name, changes, self._warned)
        except Exception as error:
            local_error.append(error)
        failures = self._failures.agree(ranks, local_error[0] if local_error else None)
        if failures:
            self._failures.report(ranks, "the curvature", failures, f"no values are logged at step {step}")
            metrics, densities = {}, {}
        for note in notes if not failures else ():
            warn_once(note, self._warned, rank_zero_warn)
        self.last, self.last_densities = metrics, densities
        self.logged_step = step if metrics else self.logged_step
        ranks.send(self.log, metrics, step, self.name, self._warned)
        return metrics

    def _quantity(self, notes: list[str], prefix: str, what: str, fn: Callable, *args: Any) -> dict[str, Any]:
        """``fn(prefix, *args)``, or nothing and a note for the warning when its products hold NaN/Inf (training
        goes on; none of its values are logged then); any other error goes up to :meth:`compute`, which
        agrees on it over the ranks."""
        try:
            out = fn(prefix, *args)
        except FloatingPointError as error:
            out = {}
            notes.append(f"{self.name}: {prefix} {what} skipped: {error}")
        # a NaN standard error only says too few samples were drawn; the values themselves must be finite
        bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v) and "std_error" not in k]
        if bad:
            notes.append(f"{self.name}: {prefix} {what} is not finite ({bad}); it is not logged")
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
        self, optimizer: torch.optim.Optimizer | None, p: str, loss: Callable, params: list[Tensor], reduce: dict
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The batch, the steps computed and the step of the last logged values."""
        return {"batch": self.batch, "computed_steps": list(self.computed_steps), "logged_step": self.logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch = state_dict.get("batch")
        self.schedule.done = list(state_dict.get("computed_steps", []))
        self.logged_step = state_dict.get("logged_step")
