"""RouterMonitor: router statistics and router health of every MoE layer, from the live training batches of each
logging window, summed across data-parallel ranks (docs/geometry.md §6)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from moe_lightning.callbacks._media import heatmap_figure
from moe_lightning.callbacks._observe import (
    PublishingCallback,
    define_step_metric,
    log_scalars,
    logging_step,
    observed_model,
    ranks_of,
    wandb_loggers,
)
from moe_lightning.common import check_positive_int, warn_once
from moe_lightning.geometry import MoEView
from moe_lightning.monitors.router_probe import RouterProbe


class RouterMonitor(PublishingCallback):
    """Log router statistics and router health of every MoE layer every ``log_every_n_steps`` training steps.

    A thin wrapper around :class:`~moe_lightning.monitors.RouterProbe`, the loop-agnostic core.

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
        - ``router/<layer>/maxvio_global`` (of the window's loads summed over micro-batches and ranks),
          ``maxvio_micro``, ``load_cv_micro`` (each micro-batch's, averaged over the window's micro-batches and
          ranks); ``load_cv`` is the global one;
        - ``router/<layer>/logit_lse_mean``, ``logit_lse_max``, ``logit_max``: router-logit drift (moe-lightning
          layers, whose records hold the logits);
        - ``router/<layer>/coactivation_tv``, ``coactivation_max_lift``: expert co-activation against independent
          routing (top-k > 1, at most 64 experts);
        - ``router/mean/<stat>``: the mean over layers of each scalar statistic;
        - ``router/layers/<stat>_p50``, ``<stat>_p90``, ``<stat>_max``: percentiles (linear interpolation) and
          maximum over layers of each scalar statistic;
        - W&B only: ``router/expert_loads``, a table (step, layer, expert, load) of the loads past
          ``max_expert_keys``, and ``router/<layer>/coactivation_heatmap``, the co-activation matrix as an image.

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
        # The hooks, the window, its sums over the ranks and its state live in the loop-agnostic core (monitors/).
        self.core = RouterProbe(log_every_n_steps, layers, max_expert_keys, name="RouterMonitor")
        self.log_every_n_steps = log_every_n_steps
        self._warned: set[str] = set()

    @property
    def views(self) -> list[MoEView]:
        return self.core.views

    @property
    def views_checked(self) -> bool:
        return self.core.views_checked

    @property
    def last_metrics(self) -> dict[str, float]:
        return self.core.last_metrics

    @property
    def _logged_step(self) -> int | None:
        return self.core._logged_step

    def _interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps or 50

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.core.every_n_steps = self._interval(trainer)
        prepare = lambda: define_step_metric(trainer, "router/*")  # noqa: E731
        self.core.attach(observed_model(pl_module), ranks_of(trainer), prepare)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last window of the run, if it holds any batch on any rank (every rank decides alike after the sum).
        self._logged(trainer, self.core.end(ranks_of(trainer)))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.core.detach()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.core.detach()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The statistics of this batch come from the weights after ``step`` optimiser steps, so they are logged at
        # that step (as Lightning logs a training_step's values), not at the incremented step seen in
        # on_train_batch_end. Every micro-batch of an accumulated step carries the same step.
        self.core.start_batch(logging_step(trainer))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_after = logging_step(trainer, after_batch=True)
        self._logged(trainer, self.core.end_batch(pl_module, step_after, ranks_of(trainer)))

    def _logged(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        """Publish a closed window's statistics and log them at its step, through every logger of the trainer."""
        if metrics is None:
            return
        self.publish(trainer, metrics)
        step = self.core._logged_step
        try:
            log_scalars(trainer, metrics, step)
            if trainer.is_global_zero:
                self._log_media(trainer, step)
        except Exception as error:  # a logger that fails must not stop training either
            warn_once(f"RouterMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)

    def _log_media(self, trainer: Trainer, step: int) -> None:
        """W&B only: every expert's load past ``max_expert_keys`` in a ``router/expert_loads`` table (step, layer,
        expert, load), and each layer's co-activation matrix as a ``router/<layer>/coactivation_heatmap`` image."""
        wandbs = wandb_loggers(trainer)
        if not wandbs:
            return
        import matplotlib.pyplot as plt
        import wandb

        cap = self.core.max_expert_keys
        rows = [
            [step, name, e, load]
            for name, loads in self.core.last_loads.items()
            for e, load in enumerate(loads)
            if cap is not None and e >= cap
        ]
        for logger in wandbs:
            payload: dict[str, Any] = {"trainer/global_step": step}
            if rows:
                payload["router/expert_loads"] = wandb.Table(columns=["step", "layer", "expert", "load"], data=rows)
            for name, matrix in self.core.last_coactivation.items():
                figure = heatmap_figure(matrix, f"{name} co-activation (step {step})")
                payload[f"router/{name}/coactivation_heatmap"] = wandb.Image(figure)
                plt.close(figure)
            if len(payload) > 1:
                logger.experiment.log(payload)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The core's state (:meth:`RouterProbe.state_dict`). Every rank enters this, as every rank enters
        ``Trainer.save_checkpoint``."""
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
