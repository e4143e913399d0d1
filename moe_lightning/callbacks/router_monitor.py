"""RouterMonitor: router statistics and router health of every MoE layer, from the live training batches of each
logging window, summed across data-parallel ranks (docs/geometry.md §6)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from moe_lightning.adapters import find_moe_layers, selection_bias
from moe_lightning.adapters.capture import layer_input
from moe_lightning.callbacks._guard import Failures, distributed
from moe_lightning.callbacks._observe import (
    PublishingCallback,
    define_step_metric,
    log_scalars,
    logging_step,
    observed_model,
    warn_state_changes,
)
from moe_lightning.callbacks._verify import verified_views
from moe_lightning.common import check_positive_int, observation, warn_once
from moe_lightning.geometry import MoEView
from moe_lightning.geometry.router import routing_sums, window_statistics
from moe_lightning.geometry.verify import MAX_CHECK_TOKENS
from moe_lightning.nn.router import MoEAux

# After the routing sums of a view: dropped, assignments, sum of aux_load_balance, sum of aux_z_loss, batches.
_AUX_FIELDS = 5


class RouterMonitor(PublishingCallback):
    """Log router statistics and router health of every MoE layer every ``log_every_n_steps`` training steps.

    Forward hooks on the MoE blocks summarise every training batch in a few small ops per layer (moe-lightning
    layers hand over their router outputs; for other models the gates are recomputed from the captured layer input,
    one small matmul) and add the summary to the window's sums. At a logging step the window's sums are summed
    across data-parallel ranks in one collective, turned into statistics, logged (rank zero) and cleared: every
    statistic covers all tokens the router saw since the last log, on every rank.

    A view whose gates the monitor recomputes is checked against its layer at the end of the first training batch,
    on that batch's layer inputs, as :class:`GeometryMonitor` checks its views (docs/adapters.md "How a view is
    checked"): a view that fails on any rank is dropped on every rank with one warning, and no value of it is ever
    logged. A moe-lightning layer hands over its router's own outputs, which need no view, and is not checked.

    A window holds every micro-batch of its optimiser steps (under gradient accumulation too), travels with the
    checkpoint (a window that spans a resume loses nothing), and the last window of a run is logged when training
    ends. It is labelled with the step whose weights routed its last batch, on the axis of Lightning's own
    ``self.log`` (optimiser steps; a batch that steps several optimisers counts once). A failure on any rank
    becomes one warning, and training goes on. The selected values also go into ``trainer.callback_metrics``,
    for ``ModelCheckpoint`` and ``EarlyStopping``.

    Logged metrics (``<layer>`` is the module path; one-expert views such as shared experts have none):
        - ``router/<layer>/load/e<i>``: share of the window's routed assignments per expert (per-expert keys capped
          by ``max_expert_keys``);
        - ``router/<layer>/load_cv``, ``load_max_over_mean``, ``entropy``, ``margin``, ``utilisation_p50``,
          ``utilisation_p90``, ``utilisation_max``, ``dead_fraction``, ``diversity`` (see
          :func:`~moe_lightning.geometry.window_statistics`);
        - ``router/<layer>/dropped_fraction``, ``aux_load_balance``, ``aux_z_loss`` (moe-lightning layers; the
          losses are means over the window's batches);
        - ``router/<layer>/bias_range``, ``bias_change`` (aux-free layers): ``max - min`` of the expert bias, and
          the largest change of an expert's bias since the last log (since fit start for the first);
        - ``router/mean/<stat>``: the mean over layers of each scalar statistic.

    Args:
        log_every_n_steps: logging interval; None uses the trainer's ``log_every_n_steps``.
        layers: layer names or glob patterns; None monitors every MoE layer found.
        max_expert_keys: per-expert load keys for at most this many experts per layer; None logs all.
        callback_metrics: the keys also put into ``trainer.callback_metrics``: fnmatch patterns, for instance
            ``"router/mean/load_cv"``; None (default) every key but the per-expert ones; ``[]`` none.

    Example::

        trainer = Trainer(callbacks=[RouterMonitor()], log_every_n_steps=10)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        layers: str | list[str] | None = None,
        max_expert_keys: int | None = 16,
        callback_metrics: str | list[str] | None = None,
    ) -> None:
        super().__init__("RouterMonitor", callback_metrics)
        check_positive_int("RouterMonitor: log_every_n_steps", log_every_n_steps, allow_none=True)
        if max_expert_keys is not None and max_expert_keys < 0:
            raise ValueError(f"RouterMonitor: max_expert_keys must be >= 0 or None, got {max_expert_keys!r}")
        self.log_every_n_steps, self.layers, self.max_expert_keys = log_every_n_steps, layers, max_expert_keys
        self.views: list[MoEView] = []
        self._handles: list[Any] = []
        self._armed = False
        self._captured: dict[str, Any] = {}
        self._window: dict[str, Tensor] = {}
        self._bias_at_log: dict[str, Tensor] = {}
        self._step = 0
        self._logged_step: int | None = None
        self._error: BaseException | None = None  # this rank's first failure in the current window
        self._failures = Failures("RouterMonitor")
        self._warned: set[str] = set()
        self.last_metrics: dict[str, float] = {}
        # The view check at the end of the first training batch (callbacks/_verify.py): each checked view's layer
        # input, this rank's capture error, whether each layer hands over its router's outputs (then its statistics
        # come from them and its view is not checked), and each unchecked view's first failure, which only counts
        # against the window if the view passes.
        self.views_checked = False
        self._check_inputs: dict[str, Tensor] = {}
        self._check_error: BaseException | None = None
        self._router_outputs: dict[str, bool] = {}
        self._unchecked_errors: dict[str, BaseException] = {}

    def _interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps or 50

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        if not self._failures.run(
            trainer, "finding the MoE layers", lambda: self._attach(trainer, pl_module), "nothing will be monitored"
        ):
            self._remove_hooks()
            self.views = []

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the layers and hook the forward pass of each MoE block."""
        define_step_metric(trainer, "router/*")
        self.views = [v for v in find_moe_layers(observed_model(pl_module), self.layers) if v.num_experts > 1]
        self._captured, self.views_checked = {}, False
        self._check_inputs, self._check_error, self._router_outputs, self._unchecked_errors = {}, None, {}, {}
        # a window restored from a checkpoint is kept; the bias of a resumed run is its last logged one
        for view in self.views:
            bias = _expert_bias(view)
            if bias is not None and view.name not in self._bias_at_log:
                self._bias_at_log[view.name] = bias.detach().clone()
        self._register_hooks()

    def _register_hooks(self) -> None:
        """One forward hook on each MoE block, for the views of ``self.views`` it holds."""
        by_module: dict[int, list[MoEView]] = {}
        for view in self.views:
            by_module.setdefault(id(view.module), []).append(view)
        for views in by_module.values():
            self._handles.append(views[0].module.register_forward_hook(self._make_hook(views), with_kwargs=True))

    def _make_hook(self, views: list[MoEView]):
        def hook(module, args, kwargs, output):
            if not self._armed or not module.training:
                return
            try:
                aux = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                aux = aux if isinstance(aux, MoEAux) else None
                x = layer_input(args, kwargs)
                for view in views:
                    self._router_outputs[view.name] = aux is not None
                # Only a layer without router outputs reads the flag, so that a compiled forward of moe-lightning
                # layers is not compiled again once the check is done (any other is, once).
                if aux is None and not self.views_checked:  # even in a window that failed: a later batch checks
                    self._keep_for_check(views, x)
            except Exception as error:  # kept for the window's agreement over ranks; training goes on
                self._error, self._check_error = self._error or error, self._check_error or error
                return
            if self._error is not None:
                return
            with torch.no_grad():
                for view in views:
                    try:
                        self._captured[view.name] = _batch_sums(view, aux, x)
                    except Exception as error:  # a view the check refuses must not cost the others their window
                        if self.views_checked:
                            self._error = error
                            return
                        self._unchecked_errors.setdefault(view.name, error)

        return hook

    def _keep_for_check(self, views: list[MoEView], x: Tensor) -> None:
        """Keep a copy of the layer's first input tokens (as many as the check uses) for the check of its views."""
        x_ND = x.detach().reshape(-1, x.shape[-1])
        for view in views:
            if view.name not in self._check_inputs:  # the batch's first forward, should the layer run twice
                self._check_inputs[view.name] = x_ND[:MAX_CHECK_TOKENS].clone()

    def _check_views(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the views whose gates the monitor reads (:func:`~moe_lightning.callbacks._verify.verified_views`,
        in the layer's own dtype, the one those gates are computed in here) and drop those refused on any rank, with
        whatever of them the window holds. Nothing is checked while a rank's capture failed (that window is not
        logged); the next batch's inputs are tried then. A collective."""
        # A layer hands over its router's outputs on every rank or on none; summed so that a rank on which the layer
        # did not run agrees too, and every rank checks the same views.
        own_V = torch.tensor([float(self._router_outputs.get(v.name, False)) for v in self.views])
        if distributed(trainer):
            own_V = trainer.strategy.reduce(own_V.to(trainer.strategy.root_device), reduce_op="sum")
        read = [v for v, own in zip(self.views, own_V.tolist(), strict=True) if own == 0]
        with observation(pl_module) as changes:
            args = (self._failures, read, self._check_inputs, self._check_error, None)
            kept = verified_views(trainer, pl_module, *args)
        warn_state_changes("RouterMonitor", changes, self._warned)
        self._check_inputs, self._check_error = {}, None
        if kept is None:
            return
        refused = {v.name for v in read} - {v.name for v in kept}
        if refused:  # from now on no refused view is summarised at all
            self.views = [v for v in self.views if v.name not in refused]
            self._remove_hooks()
            self._register_hooks()
        for name in refused:
            for store in (self._captured, self._window, self._bias_at_log):
                store.pop(name, None)
        errors = [error for name, error in self._unchecked_errors.items() if name not in refused]
        self._error = self._error or next(iter(errors), None)
        self._unchecked_errors, self.views_checked = {}, True

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last window of the run, if it holds any batch on any rank (every rank decides alike after the sum).
        if self.views and self._step != self._logged_step:
            self._close_window(trainer, self._step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The statistics of this batch come from the weights after ``step`` optimiser steps, so they are logged at
        # that step (as Lightning logs a training_step's values), not at the incremented step seen in
        # on_train_batch_end. Every micro-batch of an accumulated step carries the same step.
        self._step = logging_step(trainer)
        self._armed = True
        self._captured, self._router_outputs = {}, {}  # empty at each forward, as a compiled forward was traced

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False
        if self.views and not self.views_checked:
            self._check_views(trainer, pl_module)
        for name, sums in self._captured.items():
            self._window[name] = sums if name not in self._window else self._window[name].to(sums.device) + sums
        self._captured = {}
        stepped = logging_step(trainer, after_batch=True) > self._step  # the last micro-batch of its step
        if stepped and self._step % self._interval(trainer) == 0 and self._step != self._logged_step:
            self._close_window(trainer, self._step)

    def _close_window(self, trainer: Trainer, step: int) -> None:
        """Sum the window over the ranks, log its statistics at ``step`` and clear it; a failure on any rank in
        the window (or now) becomes one warning instead."""
        self._logged_step = step
        metrics = self._window_metrics(trainer)
        self._window, self._error = {}, None
        if metrics is None:
            return
        self.last_metrics = metrics
        self.publish(trainer, metrics)
        try:
            log_scalars(trainer, metrics, step)
        except Exception as error:  # a logger that fails must not stop training either
            warn_once(f"RouterMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)

    def _window_sums(self) -> Tensor:
        """This rank's window as one flat float64 buffer, views in order; its length depends only on the views."""
        device = next(iter(self._window.values())).device if self._window else torch.device("cpu")
        parts = [
            self._window.get(v.name, torch.zeros(_width(v), dtype=torch.float64, device=device)).to(device)
            for v in self.views
        ]
        return torch.cat(parts)

    def _window_metrics(self, trainer: Trainer) -> dict[str, float] | None:
        """Every layer's statistics of the window, from its sums over every rank (one collective for all), or None
        when a rank failed in this window; the failure is then agreed over the ranks and reported."""
        if not self.views:
            return {}
        error = self._error
        try:
            flat = self._window_sums()
        except Exception as caught:
            error = error or caught
        if error is not None:  # still enters the sum, with the right length, so that no rank waits for it
            flat = torch.zeros(sum(_width(v) for v in self.views), dtype=torch.float64)
        # One more number, the count of failed ranks, rides on the same collective.
        flat = torch.cat([flat, flat.new_tensor([float(error is not None)])])
        if distributed(trainer):
            flat = trainer.strategy.reduce(flat.to(trainer.strategy.root_device), reduce_op="sum")
        if float(flat[-1]) > 0:
            failures = self._failures.agree(trainer, error)
            self._failures.report(trainer, "the router summary", failures, "its window is not logged")
            return None
        flat = flat[:-1]
        metrics: dict[str, float] = {}
        per_stat: dict[str, list[float]] = {}
        for view, sums in zip(self.views, flat.split([_width(v) for v in self.views]), strict=True):
            if sums[view.num_experts] <= 0:  # no token in the window on any rank
                continue
            for key, value in self._view_statistics(view, sums).items():
                metrics[f"router/{view.name}/{key}"] = value
                if "/e" not in key:
                    per_stat.setdefault(key, []).append(value)
        for key, values in per_stat.items():
            metrics[f"router/mean/{key}"] = sum(values) / len(values)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        """The open window (summed over the ranks: the checkpoint is written from rank zero, and on resume rank
        zero alone holds it) and its step, the biases at the last log, and the last logged step. Every rank enters
        this, as every rank enters ``Trainer.save_checkpoint``."""
        window: dict[str, Tensor] = {}
        if self.views:
            flat = self._window_sums()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flat)
            parts = flat.split([_width(v) for v in self.views])
            window = {v.name: t.cpu() for v, t in zip(self.views, parts, strict=True)}
        return {
            "window": window,
            "step": self._step,  # the step of the window's last batch, its label if the run ends before another
            "bias_at_log": {k: v.cpu() for k, v in self._bias_at_log.items()},
            "logged_step": self._logged_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._window = dict(state_dict.get("window", {})) if rank == 0 else {}
        self._bias_at_log = dict(state_dict.get("bias_at_log", {}))
        self._logged_step = state_dict.get("logged_step")
        self._step = int(state_dict.get("step", 0))

    def _view_statistics(self, view: MoEView, sums: Tensor) -> dict[str, float]:
        routing, (dropped, assignments, lb_sum, z_sum, batches) = sums[:-_AUX_FIELDS], sums[-_AUX_FIELDS:].tolist()
        stats = window_statistics(routing)
        out = {
            f"load/e{i}": float(v)
            for i, v in enumerate(stats.pop("load").tolist())
            if self.max_expert_keys is None or i < self.max_expert_keys
        }
        out.update(stats)
        if batches > 0:
            out["dropped_fraction"] = dropped / max(assignments, 1.0)
            out["aux_load_balance"] = lb_sum / batches
            out["aux_z_loss"] = z_sum / batches
        bias = _expert_bias(view)
        if bias is not None:
            bias = bias.detach().double()
            previous = self._bias_at_log.get(view.name, torch.zeros_like(bias)).to(bias)
            out["bias_range"] = float(bias.max() - bias.min())
            out["bias_change"] = float((bias - previous).abs().max())
            self._bias_at_log[view.name] = bias.clone()
        return out


def _width(view: MoEView) -> int:
    """The length of a view's window sums: :func:`routing_sums` (``E + 3``), then the :data:`_AUX_FIELDS`."""
    return view.num_experts + 3 + _AUX_FIELDS


def _expert_bias(view: MoEView) -> Tensor | None:
    """The layer's aux-free selection bias, wherever it keeps it (:func:`moe_lightning.adapters.selection_bias`: a
    native router's or torchtitan's ``expert_bias``, a DeepSeek-V3-style gate's ``e_score_correction_bias``, ...),
    which the model's own training code updates."""
    return selection_bias(view)


def _batch_sums(view: MoEView, aux: MoEAux | None, x: Tensor) -> Tensor:
    """One batch's additive summary for a view: :func:`routing_sums`, then the :data:`_AUX_FIELDS` of an
    :class:`MoEAux` (zeros for other layers). No host synchronisation."""
    if aux is not None:
        routing = routing_sums(aux.router.gates, aux.router.probs)
        dropped = aux.dropped.double()
        assignments = aux.tokens_per_expert.sum().double() + dropped
        extra = [dropped, assignments, aux.load_balance.double(), aux.z_loss.double()]
        extra = torch.stack([t.detach().to(routing.device).reshape(()) for t in extra])
        return torch.cat([routing, extra, torch.ones(1, dtype=torch.float64, device=routing.device)])
    routing = routing_sums(view.gates(x.detach().reshape(-1, x.shape[-1])))
    return torch.cat([routing, torch.zeros(_AUX_FIELDS, dtype=torch.float64, device=routing.device)])
