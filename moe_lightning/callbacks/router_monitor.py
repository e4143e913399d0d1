"""RouterMonitor: router statistics of every MoE layer from the live training batches (docs/geometry.md §6)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.base import MoEView
from moe_lightning.adapters.capture import layer_input
from moe_lightning.callbacks._observe import define_step_metric, log_scalars, observed_model
from moe_lightning.common import check_positive_int
from moe_lightning.geometry import router_statistics
from moe_lightning.moe import MoEAux


class RouterMonitor(Callback):
    """Log router statistics of every MoE layer every ``log_every_n_steps`` training steps, at almost no cost.

    Forward hooks on the MoE blocks keep the router outputs of the logged steps only (moe-lightning layers hand
    them over; for other models the gates are recomputed from the captured layer input, one small matmul).

    The statistics of a batch are logged at the step whose weights routed it (``trainer.global_step`` at batch
    start), as Lightning labels a ``training_step``'s own values.

    Logged metrics (``<layer>`` is the module path; statistics of rank zero's batch):
        - ``router/<layer>/load/e<i>``: share of routed assignments per expert (per-expert keys capped by
          ``max_expert_keys``);
        - ``router/<layer>/load_cv``, ``load_max_over_mean``, ``entropy``, ``margin`` (see
          :func:`router_statistics`);
        - ``router/<layer>/dropped_fraction``, ``aux_load_balance``, ``aux_z_loss`` (moe-lightning layers);
        - ``router/mean/<stat>``: the mean over layers of each scalar statistic.

    Args:
        log_every_n_steps: logging interval; None uses the trainer's ``log_every_n_steps``.
        layers: layer names or glob patterns; None monitors every MoE layer found.
        max_expert_keys: per-expert load keys for at most this many experts per layer; None logs all.

    Example::

        trainer = Trainer(callbacks=[RouterMonitor()], log_every_n_steps=10)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        layers: str | list[str] | None = None,
        max_expert_keys: int | None = 16,
    ) -> None:
        super().__init__()
        check_positive_int("RouterMonitor: log_every_n_steps", log_every_n_steps, allow_none=True)
        if max_expert_keys is not None and max_expert_keys < 0:
            raise ValueError(f"RouterMonitor: max_expert_keys must be >= 0 or None, got {max_expert_keys!r}")
        self.log_every_n_steps, self.layers, self.max_expert_keys = log_every_n_steps, layers, max_expert_keys
        self.views: list[MoEView] = []
        self._handles: list[Any] = []
        self._armed = False
        self._captured: dict[str, Any] = {}
        self._step = 0
        self._logged_step: int | None = None

    def _interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps or 50

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        define_step_metric(trainer, "router/*")
        self.views = find_moe_layers(observed_model(pl_module), self.layers)
        self._remove_hooks()
        by_module: dict[int, list[MoEView]] = {}
        for view in self.views:
            by_module.setdefault(id(view.module), []).append(view)
        for views in by_module.values():
            self._handles.append(views[0].module.register_forward_hook(self._make_hook(views), with_kwargs=True))

    def _make_hook(self, views: list[MoEView]):
        def hook(module, args, kwargs, output):
            if not self._armed or not module.training:
                return
            aux = output[1] if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], MoEAux) else None
            x = layer_input(args, kwargs)
            for view in views:
                self._captured[view.name] = aux if aux is not None else x.detach().reshape(-1, x.shape[-1])

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps. The statistics of this batch come from the weights after
        # ``global_step`` steps, so they are logged at that step (as Lightning logs a training_step's values),
        # not at the incremented step seen in on_train_batch_end. Once per step under gradient accumulation.
        step = trainer.global_step
        self._armed = step % self._interval(trainer) == 0 and step != self._logged_step
        self._step = step
        self._captured = {}

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._armed:
            return
        self._armed = False
        metrics: dict[str, float] = {}
        per_stat: dict[str, list[float]] = {}
        with torch.no_grad():
            for view in self.views:
                captured = self._captured.get(view.name)
                if captured is None:
                    continue
                for key, value in self._view_statistics(view, captured).items():
                    metrics[f"router/{view.name}/{key}"] = value
                    if "/e" not in key:
                        per_stat.setdefault(key, []).append(value)
        for key, values in per_stat.items():
            metrics[f"router/mean/{key}"] = sum(values) / len(values)
        self._captured = {}
        self._logged_step = self._step
        log_scalars(trainer, metrics, self._step)

    def _view_statistics(self, view: MoEView, captured: Any) -> dict[str, float]:
        extra: dict[str, float] = {}
        if isinstance(captured, MoEAux):
            gates, probs = captured.router.gates, captured.router.probs
            assignments = captured.tokens_per_expert.sum() + captured.dropped
            extra = {
                "dropped_fraction": float(captured.dropped / assignments.clamp_min(1)),
                "aux_load_balance": float(captured.load_balance),
                "aux_z_loss": float(captured.z_loss),
            }
        else:
            gates, probs = view.gates(captured), None
        if view.num_experts == 1:
            return {}
        stats = router_statistics(gates, probs)
        out = {
            f"load/e{i}": float(v)
            for i, v in enumerate(stats.pop("load").tolist())
            if self.max_expert_keys is None or i < self.max_expert_keys
        }
        out.update(stats)
        out.update(extra)
        return out
