"""WeightSpectraMonitor: data-free spectra of every expert's weight matrices over the course of training, the
power-law α of WeightWatcher, the spectral norm and the stable rank (docs/geometry.md §8)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from moe_lightning.callbacks._observe import (
    PublishingCallback,
    define_step_metric,
    log_scalars,
    logging_step,
    observed_model,
    ranks_of,
)
from moe_lightning.common import warn_once
from moe_lightning.geometry import MoEView
from moe_lightning.monitors.weight_spectra import WeightSpectraProbe


class WeightSpectraMonitor(PublishingCallback):
    r"""Log the weight spectra of every MoE layer's experts during training: data-free, from the weights alone.

    A thin wrapper around :class:`~moe_lightning.monitors.WeightSpectraProbe`, the loop-agnostic core.

    At each scheduled step every expert matrix the layer's view offers (``w_gate``, ``w_up``, ``w_in``, ``w_out``;
    :class:`~moe_lightning.geometry.HasExpertWeights`) is copied to float64 on the CPU and its eigenvalues
    ``λ = σ²`` found; the power law ``p(λ) ∝ λ^(-α)`` is fitted to their tail as WeightWatcher fits it (Martin &
    Mahoney 2021; x_min by the smallest Kolmogorov–Smirnov distance), with the spectral norm and the stable rank
    beside it. No parameter is written, so training ends in the same weights with or without it. Under DDP each
    rank measures a share of the experts and the values are summed over the ranks; under expert parallelism each
    expert is measured on a rank that holds it; under FSDP2 each layer is gathered while it is measured. A value
    that cannot be trusted (weights with NaN/Inf, fewer than 8 eigenvalues above 1e-5 for a fit) has no key, with
    one warning naming it. The selected values also go into ``trainer.callback_metrics``.

    Logged metrics (``<layer>`` is the module path, ``<matrix>`` one of the expert's matrices, ``e<i>`` an expert;
    definitions in docs/callbacks.md):
        - ``weights/<layer>/<matrix>/alpha/e<i>``, ``.../alpha/mean``: the power-law exponent α;
        - ``weights/<layer>/<matrix>/alpha/mean_stderr``: the standard error of the mean α;
        - ``weights/<layer>/<matrix>/spectral_norm/e<i>``, ``.../spectral_norm/mean``: ``σ_max = ‖W‖₂``;
        - ``weights/<layer>/<matrix>/<quantity>/mean`` for ``alpha_stderr``, ``alpha_weighted``, ``ks_distance``,
          ``xmin``, ``tail_size``, ``stable_rank``: means over the experts with a value.

    Args:
        every_n_steps: measure when the step is a multiple of this; None disables.
        every_n_epochs: measure at the end of every n-th training epoch; None disables.
        at_fit_start: measure once at fit start, the initialisation baseline.
        at_fit_end: measure once when training ends, at its last step, unless that step was measured already.
        layers: layer names or glob patterns; None measures every MoE layer found.
        max_expert_keys: per-expert keys for at most this many experts per layer (the means cover all); None
            logs all.
        callback_metrics: the keys also put into ``trainer.callback_metrics``: fnmatch patterns; None (default)
            every key but the per-expert ones; ``[]`` none.

    Example::

        trainer = Trainer(callbacks=[WeightSpectraMonitor(every_n_steps=200)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        layers: str | list[str] | None = None,
        max_expert_keys: int | None = 16,
        callback_metrics: str | list[str] | None = None,
    ) -> None:
        super().__init__("WeightSpectraMonitor", callback_metrics)
        # The schedule, the measurement and its state live in the loop-agnostic core (monitors/).
        self.core = WeightSpectraProbe(
            every_n_steps, every_n_epochs, at_fit_start, at_fit_end, layers, max_expert_keys,
            name="WeightSpectraMonitor",
        )  # fmt: skip
        self._warned: set[str] = set()

    @property
    def views(self) -> list[MoEView]:
        return self.core.views or []

    @property
    def last_values(self) -> dict[str, float]:
        return self.core.last_values

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        prepare = lambda: define_step_metric(trainer, "weights/*")  # noqa: E731
        self.core.find_layers(observed_model(pl_module), ranks_of(trainer), prepare)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = logging_step(trainer)
        if self.core.schedule.at_start(step):
            self._measure(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logging_step(trainer, after_batch=True)
        if self.core.schedule.after_batch(step):
            self._measure(trainer, pl_module, step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = logging_step(trainer)
        if self.core.schedule.after_epoch(trainer.current_epoch + 1, step):
            self._measure(trainer, pl_module, step)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank runs on_train_end, so the final measurement's collectives meet as a scheduled one's do.
        step = logging_step(trainer)
        self._logged(trainer, self.core.end(observed_model(pl_module), step, ranks_of(trainer)), step)

    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        values = self.core.measure(observed_model(pl_module), step, ranks_of(trainer))
        self._logged(trainer, values, step)

    def _logged(self, trainer: Trainer, values: dict[str, float], step: int) -> None:
        if not values:
            return
        self.publish(trainer, values)
        try:
            log_scalars(trainer, values, step)
        except Exception as error:  # a logger that fails must not stop training either
            warn_once(f"WeightSpectraMonitor: could not log at step {step}: {error!r}", self._warned, rank_zero_warn)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
