"""RouterProbe: the loop-agnostic core of the router monitor. Router statistics and router health of every MoE
layer, from the live training batches of each logging window, summed across data-parallel ranks (docs/geometry.md
§6), from any training loop: Lightning's (``RouterMonitor``), the Hugging Face Trainer's, an Accelerate loop or a
plain one (docs/without-lightning.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lightning.adapters import find_moe_layers, selection_bias
from moe_lightning.adapters.capture import layer_input
from moe_lightning.common import check_positive_int, observation
from moe_lightning.geometry import MoEView
from moe_lightning.geometry.router import window_statistics
from moe_lightning.geometry.verify import MAX_CHECK_TOKENS
from moe_lightning.geometry.view import HasPlacement
from moe_lightning.monitors.observe import warn_state_changes
from moe_lightning.monitors.ranks import Failures, Ranks
from moe_lightning.monitors.router_stats import (
    LOGIT_MAXIMA,
    balance_statistics,
    batch_sums,
    coactivation_statistics,
    ep_rank_statistics,
    layer_percentiles,
    logit_statistics,
    window_parts,
)
from moe_lightning.monitors.router_stats import combine_windows as _combine
from moe_lightning.monitors.router_stats import empty_window as _empty_window
from moe_lightning.monitors.router_stats import window_width as _width
from moe_lightning.monitors.verify import verified_views
from moe_lightning.nn.router import MoEAux


class RouterProbe:
    """Log router statistics and router health of every MoE layer every ``every_n_steps`` training steps, from any
    loop.

    :meth:`attach` puts a forward hook on each MoE block; between :meth:`start_batch` and :meth:`end_batch` each
    training forward adds a summary of the batch (a few small ops per layer: moe-lightning layers hand over their
    router outputs, for other models the gates are recomputed from the layer input) to the window's sums. When a
    step that is a multiple of ``every_n_steps`` ends, the window is summed across the ranks of
    ``torch.distributed`` in one collective, turned into statistics, handed to ``log`` (rank zero), returned and
    cleared. The views whose gates are recomputed are checked once, at the end of the first batch, and a refused
    view is dropped with one warning. The window travels in :meth:`state_dict`; :meth:`end` logs the last one. A
    failure on any rank becomes one warning, and training goes on. The keys are those of ``RouterMonitor``
    (docs/callbacks.md).

    Args:
        every_n_steps: logging interval in optimiser steps.
        layers: layer names or glob patterns; None monitors every MoE layer found.
        max_expert_keys: per-expert load keys for at most this many experts per layer; None logs all.
        log: ``log(values, step)``, called on rank zero with each window's statistics (``wandb.log``-like).
        name: the name the warnings and errors begin with.

    Example::

        router = RouterProbe(every_n_steps=10, log=lambda values, step: wandb.log(values, step=step))
        router.attach(model)
        for step, batch in enumerate(loader):
            router.start_batch(step)  # the batch is routed by the weights after ``step`` steps
            train_step(model, batch)
            router.end_batch(model, step + 1)
        router.end()
        router.detach()
    """

    def __init__(
        self,
        every_n_steps: int | None = 50,
        layers: str | list[str] | None = None,
        max_expert_keys: int | None = 16,
        log: Callable[[dict[str, float], int], Any] | None = None,
        name: str = "RouterProbe",
    ) -> None:
        check_positive_int(f"{name}: every_n_steps", every_n_steps, allow_none=True)
        if max_expert_keys is not None and max_expert_keys < 0:
            raise ValueError(f"{name}: max_expert_keys must be >= 0 or None, got {max_expert_keys!r}")
        self.every_n_steps, self.layers, self.max_expert_keys = every_n_steps, layers, max_expert_keys
        self.name, self.log = name, log
        self.views: list[MoEView] = []
        self._handles: list[Any] = []
        self._armed = False
        self._captured: dict[str, Any] = {}
        self._window: dict[str, Tensor] = {}
        self._bias_at_log: dict[str, Tensor] = {}
        self._step = 0
        self._logged_step: int | None = None
        self._error: BaseException | None = None  # this rank's first failure in the current window
        self._failures = Failures(name)
        self._warned: set[str] = set()
        self.last_metrics: dict[str, float] = {}
        # The last logged window's share of every expert (past ``max_expert_keys`` too) and co-activation matrix
        # (share of tokens routed to both experts, (E, E)) of each layer, for the loggers that take tables and images.
        self.last_loads: dict[str, list[float]] = {}
        self.last_coactivation: dict[str, Tensor] = {}
        # The view check at the end of the first training batch (monitors/verify.py): each checked view's layer
        # input, this rank's capture error, whether each layer hands over its router's outputs (then its statistics
        # come from them and its view is not checked), and each unchecked view's first failure, which only counts
        # against the window if the view passes.
        self.views_checked = False
        self._check_inputs: dict[str, Tensor] = {}
        self._check_error: BaseException | None = None
        self._router_outputs: dict[str, bool] = {}
        self._unchecked_errors: dict[str, BaseException] = {}

    # ------------------------------------------------------------------ the loop's calls
    def attach(self, model: nn.Module, ranks: Ranks | None = None, prepare: Callable[[], Any] | None = None) -> None:
        """Find the MoE layers of ``model`` (``prepare()`` first, if given) and hook each MoE block's forward; a
        failure on any rank is one warning, and nothing is monitored. A collective."""
        ranks = ranks or Ranks.current()
        self.detach()

        def attach() -> None:
            if prepare is not None:
                prepare()
            self._attach(model)

        if not self._failures.run(ranks, "finding the MoE layers", attach, "nothing will be monitored"):
            self.detach()
            self.views = []

    def detach(self) -> None:
        """Remove every hook (:meth:`attach` puts them back)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start_batch(self, step: int) -> None:
        """Before a training batch's forward: its statistics belong to ``step``, the optimiser steps that made the
        weights that route it (every micro-batch of an accumulated step carries the same step)."""
        self._step = step
        self._armed = True
        self._captured, self._router_outputs = {}, {}  # empty at each forward, as a compiled forward was traced

    def end_batch(self, model: nn.Module, step_after: int, ranks: Ranks | None = None) -> dict[str, float] | None:
        """After a training batch: add it to the window; ``step_after`` is the optimiser steps taken after it (the
        step of :meth:`start_batch` for a micro-batch that only accumulated gradients). When the step the batch
        closed is a multiple of ``every_n_steps``, log the window. Returns the values logged now, or None. Every
        rank calls it (the window's sum is a collective); ``model`` is the whole model."""
        ranks = ranks or Ranks.current()
        self._armed = False
        if self.views and not self.views_checked:
            self._check_views(model, ranks)
        for name, sums in self._captured.items():
            self._window[name] = sums if name not in self._window else _combine(self._window[name], sums)
        self._captured = {}
        stepped = step_after > self._step  # the last micro-batch of its step
        interval = self.every_n_steps
        if stepped and interval and self._step % interval == 0 and self._step != self._logged_step:
            return self._close_window(self._step, ranks)
        return None

    def end(self, ranks: Ranks | None = None) -> dict[str, float] | None:
        """When training ends: log the last window, if it holds any batch on any rank. Returns the values logged
        now, or None. Every rank calls it."""
        ranks = ranks or Ranks.current()
        if self.views and self._step != self._logged_step:
            return self._close_window(self._step, ranks)
        return None

    # ------------------------------------------------------------------ hooks
    def _attach(self, model: nn.Module) -> None:
        self.views = [v for v in find_moe_layers(model, self.layers) if v.num_experts > 1]
        self._captured, self.views_checked = {}, False
        self._check_inputs, self._check_error, self._router_outputs, self._unchecked_errors = {}, None, {}, {}
        # a window restored from a checkpoint is kept (unless another version wrote it with another layout); the
        # bias of a resumed run is its last logged one
        for view in self.views:
            if view.name in self._window and self._window[view.name].numel() != _width(view) + LOGIT_MAXIMA:
                self._window.pop(view.name)
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
                        self._captured[view.name] = batch_sums(view, aux, x)
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

    def _check_views(self, model: nn.Module, ranks: Ranks) -> None:
        """Check the views whose gates the monitor reads (:func:`~moe_lightning.monitors.verify.verified_views`,
        in the layer's own dtype, the one those gates are computed in here) and drop those refused on any rank, with
        whatever of them the window holds. Nothing is checked while a rank's capture failed (that window is not
        logged); the next batch's inputs are tried then. A collective."""
        # A layer hands over its router's outputs on every rank or on none; summed so that a rank on which the layer
        # did not run agrees too, and every rank checks the same views.
        own_V = torch.tensor([float(self._router_outputs.get(v.name, False)) for v in self.views])
        own_V = ranks.sum(own_V)
        read = [v for v, own in zip(self.views, own_V.tolist(), strict=True) if own == 0]
        with observation(model) as changes:
            args = (self._failures, read, self._check_inputs, self._check_error, None)
            kept = verified_views(ranks, model, *args)
        warn_state_changes(self.name, changes, self._warned)
        self._check_inputs, self._check_error = {}, None
        if kept is None:
            return
        refused = {v.name for v in read} - {v.name for v in kept}
        if refused:  # from now on no refused view is summarised at all
            self.views = [v for v in self.views if v.name not in refused]
            self.detach()
            self._register_hooks()
        for name in refused:
            for store in (self._captured, self._window, self._bias_at_log):
                store.pop(name, None)
        errors = [error for name, error in self._unchecked_errors.items() if name not in refused]
        self._error = self._error or next(iter(errors), None)
        self._unchecked_errors, self.views_checked = {}, True

    # ------------------------------------------------------------------ windows
    def _close_window(self, step: int, ranks: Ranks) -> dict[str, float] | None:
        """Sum the window over the ranks, hand its statistics to ``log`` at ``step``, clear it and return them; a
        failure on any rank in the window (or now) becomes one warning instead, and None."""
        self._logged_step = step
        metrics = self._window_metrics(ranks)
        self._window, self._error = {}, None
        if metrics is None:
            return None
        self.last_metrics = metrics
        ranks.send(self.log, metrics, step, self.name, self._warned)
        return metrics

    def _window_sums(self, rank: int, world_size: int) -> Tensor:
        """This rank's window as one flat float64 buffer whose sum over the ranks holds the window of all: the
        views' sums in order, then a ``(world_size, views * LOGIT_MAXIMA)`` block whose row ``rank`` holds this
        rank's maxima and the other rows 0 (a sum of one value and zeros is that value exactly, so the one
        collective, a sum, also gathers the maxima). Its length depends only on the views and the world size."""
        device = next(iter(self._window.values())).device if self._window else torch.device("cpu")
        full = [self._window.get(v.name) for v in self.views]
        full = [_empty_window(v, device) if t is None else t.to(device) for v, t in zip(self.views, full, strict=True)]
        maxima = torch.cat([t[_width(v) :] for v, t in zip(self.views, full, strict=True)])
        slots = torch.zeros(world_size, maxima.numel(), dtype=torch.float64, device=device)
        slots[rank] = maxima
        return torch.cat([t[: _width(v)] for v, t in zip(self.views, full, strict=True)] + [slots.reshape(-1)])

    def _split_window(self, flat: Tensor, world_size: int) -> list[Tensor]:
        """Each view's window (its sums, then its maxima) from the sum over the ranks of :meth:`_window_sums`."""
        widths = [_width(v) for v in self.views]
        sums, slots = flat[: sum(widths)], flat[sum(widths) :].reshape(world_size, -1)
        maxima = slots.max(dim=0).values.split(LOGIT_MAXIMA)
        return [torch.cat([s, m]) for s, m in zip(sums.split(widths), maxima, strict=True)]

    def _window_metrics(self, ranks: Ranks) -> dict[str, float] | None:
        """Every layer's statistics of the window, from its sums over every rank (one collective for all), or None
        when a rank failed in this window; the failure is then agreed over the ranks and reported."""
        if not self.views:
            return {}
        error = self._error
        try:
            flat = self._window_sums(ranks.rank, ranks.world_size)
        except Exception as caught:
            error = error or caught
        if error is not None:  # still enters the sum, with the right length, so that no rank waits for it
            width = sum(_width(v) + ranks.world_size * LOGIT_MAXIMA for v in self.views)
            flat = torch.zeros(width, dtype=torch.float64)
        # One more number, the count of failed ranks, rides on the same collective.
        flat = torch.cat([flat, flat.new_tensor([float(error is not None)])])
        flat = ranks.sum(flat)
        if float(flat[-1]) > 0:
            failures = self._failures.agree(ranks, error)
            self._failures.report(ranks, "the router summary", failures, "its window is not logged")
            return None
        metrics: dict[str, float] = {}
        per_stat: dict[str, list[float]] = {}
        self.last_loads, self.last_coactivation = {}, {}
        for view, sums in zip(self.views, self._split_window(flat[:-1], ranks.world_size), strict=True):
            if sums[view.num_experts] <= 0:  # no token in the window on any rank
                continue
            for key, value in self._view_statistics(view, sums).items():
                metrics[f"router/{view.name}/{key}"] = value
                if "/e" not in key:
                    per_stat.setdefault(key, []).append(value)
        for key, values in per_stat.items():
            metrics[f"router/mean/{key}"] = sum(values) / len(values)
        metrics.update(layer_percentiles(per_stat))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The open window (summed over the ranks: the checkpoint is written from rank zero, and on resume rank zero
        alone holds it) and its step, the biases at the last log, and the last logged step. Every rank enters this
        (a collective), as every rank enters Lightning's ``Trainer.save_checkpoint`` and the Hugging Face
        callback's save."""
        window: dict[str, Tensor] = {}
        if self.views:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
            flat = self._window_sums(rank, world_size)
            if distributed:
                dist.all_reduce(flat)
            parts = self._split_window(flat, world_size)
            window = {v.name: t.cpu() for v, t in zip(self.views, parts, strict=True)}
        return {
            "window": window,
            "step": self._step,  # the step of the window's last batch, its label if the run ends before another
            "bias_at_log": {k: v.cpu() for k, v in self._bias_at_log.items()},
            "logged_step": self._logged_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._window = dict(state_dict.get("window", {})) if rank == 0 else {}
        self._bias_at_log = dict(state_dict.get("bias_at_log", {}))
        self._logged_step = state_dict.get("logged_step")
        self._step = int(state_dict.get("step", 0))

    def _view_statistics(self, view: MoEView, window: Tensor) -> dict[str, float]:
        E = view.num_experts
        routing, aux, micro, logits, coactivation, maxima = window.split(
            window_parts(view.num_experts) + [LOGIT_MAXIMA]
        )
        dropped, assignments, lb_sum, z_sum, batches = aux.tolist()
        stats = window_statistics(routing)
        self.last_loads[view.name] = stats["load"].tolist()
        out = {
            f"load/e{i}": float(v)
            for i, v in enumerate(stats.pop("load").tolist())
            if self.max_expert_keys is None or i < self.max_expert_keys
        }
        out.update(stats)
        out.update(balance_statistics(routing[:E], micro))
        placement = view.placement() if isinstance(view, HasPlacement) else None
        if placement is not None and 0 < len(placement.local_experts) < E:
            out.update(ep_rank_statistics(routing[:E], E // len(placement.local_experts), self.max_expert_keys))
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
        out.update(logit_statistics(logits, maxima))
        if coactivation.numel():
            coactive = coactivation_statistics(coactivation, float(routing[E]))
            if coactive:
                self.last_coactivation[view.name] = (coactivation / float(routing[E])).reshape(E, E).cpu()
            out.update(coactive)
        return out


def _expert_bias(view: MoEView) -> Tensor | None:
    """The layer's aux-free selection bias, wherever it keeps it (:func:`moe_lightning.adapters.selection_bias`: a
    native router's or torchtitan's ``expert_bias``, a DeepSeek-V3-style gate's ``e_score_correction_bias``, ...),
    which the model's own training code updates."""
    return selection_bias(view)
