"""WeightSpectraProbe: the loop-agnostic core of the weight spectra monitor. Data-free spectra of every expert's
weight matrices (WeightWatcher's power-law α, spectral norm, stable rank; docs/geometry.md §8) at the steps of its
schedule, from any training loop: Lightning's (``WeightSpectraMonitor``) or a loop of your own.

Shape legend: ``E`` experts, ``Q`` quantities of one matrix, ``M`` matrices of one expert, ``V`` layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_lightning.adapters import find_moe_layers
from moe_lightning.common import check_positive_int, warn_once
from moe_lightning.geometry import HasExpertWeights, MoEView
from moe_lightning.geometry.view import HasPlacement
from moe_lightning.geometry.weight_spectra import (
    EIGENVALUE_THRESHOLD,
    MIN_EIGENVALUES,
    WEIGHT_QUANTITIES,
    WeightSpectra,
    layer_weight_spectra,
)
from moe_lightning.monitors.ranks import Failures, Ranks, rank_zero_warn
from moe_lightning.monitors.schedule import Schedule, warn_if_stale
from moe_lightning.monitors.sharded import gathered

Log = Callable[[dict[str, float], int], Any]


def measured_experts(view: MoEView, ranks: Ranks) -> list[int]:
    """The experts this rank measures, such that every expert is measured on exactly one rank.

    Every rank holds every expert (DDP, FSDP2 once gathered): rank ``r`` measures experts ``r, r + P, ...`` of its
    ``P`` ranks. Under expert parallelism (a view whose ``placement()`` is not None) each expert group holds every
    expert once between its ranks: the ranks of the group that holds global rank zero measure their own experts,
    the other groups (data-parallel replicas of the same weights) none.
    """
    placement = view.placement() if isinstance(view, HasPlacement) else None
    if placement is None:
        return list(range(ranks.rank, view.num_experts, ranks.world_size))
    if ranks.distributed and 0 not in dist.get_process_group_ranks(placement.group):
        return []
    return list(placement.local_experts)


def matrix_names(view: MoEView) -> list[str] | None:
    """The names of the matrices the view's experts have (every expert the same), from one expert this rank
    holds; None where the view does not offer its weights."""
    if not isinstance(view, HasExpertWeights):
        return None
    placement = view.placement() if isinstance(view, HasPlacement) else None
    first = placement.local_experts.start if placement is not None else 0
    matrices = view.expert_weights(first)
    return None if matrices is None else list(matrices)


class WeightSpectraProbe:
    """Measure the weight spectra of every MoE layer's experts at the steps of a schedule, from any loop.

    Data-free: no tokens, no forward. Each matrix is copied to float64 on the CPU and decomposed
    (:func:`~moe_lightning.geometry.weight_spectra.layer_weight_spectra`); no parameter is written, so training
    ends in the same weights with or without it. Each expert is measured on one rank
    (:func:`measured_experts`) and the values are summed over the ranks in one collective (a sum of one value and
    zeros is that value exactly), so every rank ends with the values of the whole model. Under FSDP2 each layer's
    weights are gathered while it is measured. A value that cannot be trusted (weights holding NaN/Inf, fewer than 8
    eigenvalues above 1e-5 for a fit) has no key, with one warning naming the layer, the matrix and the experts; a
    failure on any rank becomes one warning, and training goes on. The keys are those of ``WeightSpectraMonitor``
    (docs/callbacks.md).

    Args:
        every_n_steps: measure when the step is a multiple of this; None disables.
        every_n_epochs: measure at the end of every n-th epoch (:meth:`end_epoch`); None disables.
        at_start: measure once before the first step (:meth:`start`), the initialisation baseline.
        at_end: measure once in :meth:`end`, at the last step, unless that step was measured already.
        layers: layer names or glob patterns; None measures every MoE layer found whose view offers its weights.
        max_expert_keys: per-expert keys for at most this many experts per layer; None all.
        log: ``log(values, step)``, called on rank zero with each measurement's scalars (``wandb.log``-like).
        name: the name the warnings begin with.

    Example::

        spectra = WeightSpectraProbe(every_n_steps=100, log=lambda values, step: wandb.log(values, step=step))
        spectra.start(model, 0)
        for step, batch in enumerate(loader, start=1):
            train_step(model, batch)
            spectra(model, step)
        spectra.end(model, step)
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        layers: str | list[str] | None = None,
        max_expert_keys: int | None = 16,
        log: Log | None = None,
        name: str = "WeightSpectraProbe",
    ) -> None:
        for option, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            check_positive_int(f"{name}: {option}", value, allow_none=True)
        if max_expert_keys is not None and (not isinstance(max_expert_keys, int) or max_expert_keys < 0):
            raise ValueError(f"{name}: max_expert_keys must be an int >= 0 or None, got {max_expert_keys!r}")
        self.name, self.log, self.layers, self.max_expert_keys = name, log, layers, max_expert_keys
        self.schedule = Schedule(every_n_steps, at_start, every_n_epochs, at_end)
        self.views: list[MoEView] | None = None  # None until the layers are found
        self._matrices: dict[str, list[str]] = {}
        self.logged_steps: dict[str, int] = {}
        self.last_spectra: dict[str, WeightSpectra] = {}
        self.last_values: dict[str, float] = {}
        self._failures = Failures(name)
        self._warned: set[str] = set()
        self._unfitted_warned: set[tuple[str, str, str, tuple[int, ...]]] = set()  # (layer, matrix, why, experts)

    # ------------------------------------------------------------------ the loop's calls
    def start(self, model: nn.Module, step: int = 0, ranks: Ranks | None = None) -> dict[str, float]:
        """Before the first step: the baseline, if the schedule asks for it. Returns the values logged now."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        return self.measure(model, step, ranks) if self.schedule.at_start(step) else {}

    def __call__(self, model: nn.Module, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """After the optimiser step that made ``step`` steps: measure if the schedule says so. Every rank calls it."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        return self.measure(model, step, ranks) if self.schedule.after_batch(step) else {}

    def end_epoch(self, model: nn.Module, epochs_done: int, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """At the end of an epoch: measure if ``every_n_epochs`` says so."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        return self.measure(model, step, ranks) if self.schedule.after_epoch(epochs_done, step) else {}

    def end(self, model: nn.Module, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """When training ends at ``step``: the final measurement (``at_end``), then a warning if a layer's last
        values lie far from ``step``."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        values = self.measure(model, step, ranks) if self.views and self.schedule.at_end(step) else {}
        if self.views:
            last = {view.name: self.logged_steps.get(view.name) for view in self.views}
            warn_if_stale(self.name, last, step, self.schedule, what="measurement")
        return values

    # ------------------------------------------------------------------ layers
    def find_layers(self, model: nn.Module, ranks: Ranks | None = None, prepare: Callable[[], Any] | None = None):
        """Find the MoE layers of ``model`` whose views offer their experts' weights (``prepare()`` first, if
        given); those that do not are named in one warning. A collective."""
        ranks = ranks or Ranks.current()
        found: list[MoEView] = []

        def find() -> None:
            if prepare is not None:
                prepare()
            found.extend(find_moe_layers(model, self.layers))

        if not self._failures.run(ranks, "finding the MoE layers", find, "nothing will be measured"):
            found.clear()
        self.views, self._matrices = [], {}
        without = []
        for view in found:
            names = matrix_names(view)
            if names:
                self.views.append(view)
                self._matrices[view.name] = names
            else:
                without.append(view.name)
        if without:
            rank_zero_warn(
                f"{self.name}: the views of {without} do not offer their experts' weights (expert_weights); their "
                "weight spectra are not measured"
            )
        if not self.views and not without:
            rank_zero_warn(f"{self.name}: no MoE layers found in {type(model).__name__}; nothing will be measured")

    def _ensure_layers(self, model: nn.Module, ranks: Ranks) -> None:
        if self.views is None:
            self.find_layers(model, ranks)

    # ------------------------------------------------------------------ the measurement
    def measure(self, model: nn.Module, step: int, ranks: Ranks | None = None) -> dict[str, float]:
        """Measure every layer now, at ``step``, whatever the schedule; hand the scalars to ``log`` (rank zero) and
        return them. A collective: every rank calls it."""
        ranks = ranks or Ranks.current()
        self._ensure_layers(model, ranks)
        self.schedule.done.append(step)
        if not self.views:
            self.last_values = {}
            return {}
        spectra, errors = {}, {}
        with torch.no_grad():
            for view in self.views:
                try:
                    with gathered(view.module, root=model):  # a collective every rank enters, view by view
                        measured = layer_weight_spectra(view, measured_experts(view, ranks))
                    if measured is None:
                        raise ValueError(f"view {view.name!r} no longer offers its experts' weights")
                    spectra[view.name] = measured
                except Exception as error:  # a measurement must never stop training; agreed over ranks below
                    errors[view.name] = error
        spectra = self._summed(spectra, errors, ranks)
        scalars: dict[str, float] = {}
        for name, layer in spectra.items():
            scalars.update(layer.scalars(f"weights/{name}", self.max_expert_keys))
            self._warn_unfitted(layer, step)
        self.logged_steps.update(dict.fromkeys(spectra, step))
        self.last_spectra, self.last_values = spectra, scalars
        ranks.send(self.log, scalars, step, self.name, self._warned)
        return scalars

    def _summed(
        self, spectra: dict[str, WeightSpectra], errors: dict[str, BaseException], ranks: Ranks
    ) -> dict[str, WeightSpectra]:
        """Every layer's values summed over the ranks in one collective (each expert's from the one rank that
        measured it), with a failure flag per layer in front: a layer that failed on any rank is dropped, with one
        warning. Without several ranks, the layers that did not fail."""
        assert self.views is not None
        blocks_V, shapes = [], []
        for view in self.views:
            M, E = len(self._matrices[view.name]), view.num_experts
            shapes.append((M, E))
            block_MQE = torch.zeros(M, len(WEIGHT_QUANTITIES), E, dtype=torch.float64)
            layer = spectra.get(view.name)
            if layer is not None and view.name not in errors:
                for m, matrix in enumerate(self._matrices[view.name]):
                    if matrix not in layer.values:  # a rank that measures none of the layer's experts adds 0
                        continue
                    for q, quantity in enumerate(WEIGHT_QUANTITIES):
                        values_E = layer.values[matrix][quantity]
                        measured_E = torch.zeros(E, dtype=torch.bool)
                        measured_E[measured_experts(view, ranks)] = True
                        # an expert another rank measures adds 0; one measured here its value, NaN included
                        block_MQE[m, q] = torch.where(measured_E, values_E, torch.zeros_like(values_E))
            blocks_V.append(block_MQE.reshape(-1))
        flags_V = torch.tensor([float(v.name in errors) for v in self.views], dtype=torch.float64)
        flat = torch.cat([flags_V, *blocks_V])
        if ranks.distributed:
            flat = ranks.sum(flat).cpu()
        flags_V, *summed_V = flat.split([len(self.views)] + [M * len(WEIGHT_QUANTITIES) * E for M, E in shapes])
        out: dict[str, WeightSpectra] = {}
        for view, failed, block, (M, E) in zip(self.views, flags_V.tolist(), summed_V, shapes, strict=True):
            if failed:
                mine = errors.get(view.name)
                detail = f": {mine!r}" if mine is not None else " on another rank"
                warn_once(
                    f"{self.name}: measuring the weight spectra of {view.name!r} failed{detail}; its values are not "
                    "logged. Training goes on.",
                    self._warned,
                    rank_zero_warn,
                )
                continue
            block_MQE = block.reshape(M, len(WEIGHT_QUANTITIES), E)
            values = {
                matrix: {quantity: block_MQE[m, q].clone() for q, quantity in enumerate(WEIGHT_QUANTITIES)}
                for m, matrix in enumerate(self._matrices[view.name])
            }
            eigenvalues = spectra[view.name].eigenvalues if view.name in spectra else {}
            out[view.name] = WeightSpectra(view.name, E, values, eigenvalues)
        return out

    def _warn_unfitted(self, layer: WeightSpectra, step: int) -> None:
        """One warning per layer, matrix, reason and set of experts whose values are not logged, naming the step
        it was first seen at."""
        for matrix, quantities in layer.values.items():
            norm_E, alpha_E = quantities["spectral_norm"], quantities["alpha"]
            nonfinite = tuple(e for e in range(layer.num_experts) if math.isnan(float(norm_E[e])))
            unfitted = tuple(
                e for e in range(layer.num_experts) if math.isnan(float(alpha_E[e])) and e not in nonfinite
            )
            reasons = (
                ("nonfinite", nonfinite, "holds NaN/Inf; their weight spectra are not logged"),
                (
                    "unfitted",
                    unfitted,
                    f"has fewer than {MIN_EIGENVALUES} eigenvalues above {EIGENVALUE_THRESHOLD:g}, too few for "
                    "WeightWatcher's power-law fit; no alpha is logged for them",
                ),
            )
            for why, experts, what in reasons:
                key = (layer.name, matrix, why, experts)
                if experts and key not in self._unfitted_warned:
                    self._unfitted_warned.add(key)
                    named = f"{layer.name} {matrix} of experts {_experts(experts)}"
                    rank_zero_warn(f"{self.name}: {named} {what} (step {step})")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The steps measured and each layer's last logged step."""
        return {"measured_steps": list(self.schedule.done), "logged_steps": dict(self.logged_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.done = list(state_dict.get("measured_steps", []))
        self.logged_steps = dict(state_dict.get("logged_steps", {}))


def _experts(experts: tuple[int, ...]) -> str:
    shown = ", ".join(str(e) for e in experts[:8])
    return shown + (f" and {len(experts) - 8} more" if len(experts) > 8 else "")
