"""CurvatureMonitor: top Hessian eigenvalue and Hutchinson trace of the training loss (docs/geometry.md §7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from typing_extensions import override

from moe_lightning.adapters.capture import to_device
from moe_lightning.callbacks._observe import cpu_copy, define_step_metric, log_scalars
from moe_lightning.common import check_positive_int, observation
from moe_lightning.geometry import hessian_top_eigenvalue, hutchinson_trace


class CurvatureMonitor(Callback):
    """Loss curvature on a fixed batch, on its own schedule (heavier than the other monitors; off by default in
    the configs).

    The batch is the first training batch (kept in the callback's state, so a resumed run uses the same one).
    Hessian-vector products use double backward through ``torch.autograd.grad``, so ``.grad`` buffers are never
    touched; modes and RNG states are restored.

    Logged metrics:
        - ``curvature/hessian_top_eigenvalue``, ``curvature/hessian_top_iterations``,
          ``curvature/hessian_top_converged``;
        - ``curvature/hessian_trace``, ``curvature/hessian_trace_std_error``, ``curvature/hessian_trace_samples``.

    Args:
        every_n_steps: compute when ``trainer.global_step`` is a multiple of this.
        at_fit_start: also compute at the first training batch (the initialisation baseline).
        eigenvalue: compute the top eigenvalue (power iteration).
        trace: compute the Hutchinson trace (Rademacher vectors).
        eigen_max_iter: most power iterations.
        eigen_tol: relative tolerance of the power iteration.
        trace_max_samples: most Hutchinson samples.
        trace_tol: stop when the standard error is below ``trace_tol * |trace|``.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar``; default ``pl_module.loss(batch)`` (the moe-lightning
            modules' total loss without logging).
        seed: seed of the random vectors (a local generator; the global RNG is untouched).

    Example::

        trainer = Trainer(callbacks=[CurvatureMonitor(every_n_steps=500)])
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        at_fit_start: bool = True,
        eigenvalue: bool = True,
        trace: bool = True,
        eigen_max_iter: int = 20,
        eigen_tol: float = 1e-3,
        trace_max_samples: int = 20,
        trace_tol: float = 1e-2,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("CurvatureMonitor: every_n_steps", every_n_steps)
        if not (eigenvalue or trace):
            raise ValueError("CurvatureMonitor: at least one of eigenvalue or trace must be True")
        self.every_n_steps, self.at_fit_start = every_n_steps, at_fit_start
        self.eigenvalue, self.trace = eigenvalue, trace
        self.eigen_max_iter, self.eigen_tol = eigen_max_iter, eigen_tol
        self.trace_max_samples, self.trace_tol = trace_max_samples, trace_tol
        self.loss_fn, self.seed = loss_fn, seed
        self.batch: Any = None
        self.computed_steps: list[int] = []
        self.last: dict[str, float] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, "loss", None)):
            raise ValueError(
                f"CurvatureMonitor: {type(pl_module).__name__} has no loss(batch) method; "
                "pass loss_fn=lambda module, batch: <scalar loss>"
            )
        define_step_metric(trainer, "curvature/*")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.batch is None:
            self.batch = cpu_copy(batch)
            if self.at_fit_start and trainer.global_step not in self.computed_steps:
                self.compute(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step not in self.computed_steps:
            self.compute(trainer, pl_module)

    def compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Compute and log the curvature now; returns the logged values."""
        self.computed_steps.append(trainer.global_step)
        batch = to_device(self.batch, pl_module.device)
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def loss() -> Tensor:
            if self.loss_fn is not None:
                return self.loss_fn(pl_module, batch)
            out = pl_module.loss(batch)
            return out[0] if isinstance(out, tuple) else out

        metrics: dict[str, float] = {}
        # Double backward needs the math attention kernel: the fused CPU/CUDA kernels have no second derivative.
        with observation(pl_module, grad=True), sdpa_kernel([SDPBackend.MATH]):
            if self.eigenvalue:
                eig = hessian_top_eigenvalue(
                    loss, params, max_iter=self.eigen_max_iter, tol=self.eigen_tol, seed=self.seed
                )
                metrics.update(
                    {
                        "curvature/hessian_top_eigenvalue": eig.eigenvalue,
                        "curvature/hessian_top_iterations": eig.iterations,
                        "curvature/hessian_top_converged": float(eig.converged),
                    }
                )
            if self.trace:
                tr = hutchinson_trace(loss, params, max_iter=self.trace_max_samples, tol=self.trace_tol, seed=self.seed)
                metrics.update(
                    {
                        "curvature/hessian_trace": tr.trace,
                        "curvature/hessian_trace_std_error": tr.std_error,
                        "curvature/hessian_trace_samples": tr.iterations,
                    }
                )
        self.last = metrics
        log_scalars(trainer, metrics, trainer.global_step)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "computed_steps": list(self.computed_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch = state_dict.get("batch")
        self.computed_steps = list(state_dict.get("computed_steps", []))
