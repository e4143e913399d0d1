"""What the run dashboard draws, gathered from one run: every geometry quantity of a layer over steps (with its
experts, its spread and its chance level), the spectrum at every saved probe, the router load per expert, the
alignment and overlap matrices at the first and the last probe, and the curvature curves.

Shapes: ``M`` singular values (or eigenvalues) of a spectrum, ``S`` probe steps, ``E`` experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moe_lightning.analysis.experts import expert_mean_spectrum
from moe_lightning.analysis.run import Run, geometry_steps, layer_names, load_geometry

# The chance level each quantity is read against (docs/geometry.md §4-5): a logged key, or a constant.
CHANCE: dict[str, str | float] = {
    "align_mean_offdiag": "align_chance",
    "align_max_offdiag": "align_chance",
    "palign_mean_offdiag": "align_chance",
    "palign_max_offdiag": "align_chance",
    "align_ratio": 1.0,
    "palign_ratio": 1.0,
    "subspace_fun_overlap": "subspace_overlap_chance",
    "subspace_rep_overlap": "subspace_overlap_chance",
    "subspace_fun_overlap_max": "subspace_overlap_chance",
    "subspace_rep_overlap_max": "subspace_overlap_chance",
}
CHANCE_KEYS = {value for value in CHANCE.values() if isinstance(value, str)}
# Panel order: quantities whose name starts with an earlier prefix come first.
QUANTITY_ORDER = ("jac_", "layer_jac_", "pca_input", "pca_hidden", "pca_output", "align_", "palign_", "subspace_")
# The E x E matrices shown at the first and the last probe (geodesic and projection distances are the same
# subspaces' overlaps seen differently, and are left out as GeometryMonitor's W&B heatmaps leave them out).
MATRICES = ("align_mean_jacobian", "align_pointwise", "subspace_fun_overlap", "subspace_rep_overlap")
SPECTRA = (
    ("jac_mean_spectrum", "expert mean, weighted by Σw"),
    ("layer_jac_mean_spectrum", "layer (through the router)"),
)
_EXPERT = re.compile(r"e(\d+)")


@dataclass
class Quantity:
    """One geometry quantity of one layer over steps.

    Attributes:
        name: the quantity, e.g. ``jac_sigma_max`` or ``align_ratio``.
        value: the layer-level value, or the mean over experts, by step.
        experts: expert ``e<i>`` -> its value by step (per-expert quantities only).
        spread: the token-level standard deviation logged next to it (``<name>_std``), by step, if any.
        chance: the chance level by step (a constant is a one-value series at every step), if it has one.
    """

    name: str
    value: pd.Series
    experts: dict[str, pd.Series] = field(default_factory=dict)
    spread: pd.Series | None = None
    chance: pd.Series | None = None


def _logged(history: pd.DataFrame, key: str) -> pd.Series | None:
    if key not in history.columns:
        return None
    series = history[key].dropna()
    return series if len(series) else None


def _order(name: str) -> tuple[int, str]:
    rank = next((i for i, prefix in enumerate(QUANTITY_ORDER) if name.startswith(prefix)), len(QUANTITY_ORDER))
    return rank, name


def layer_quantities(history: pd.DataFrame, layer: str) -> list[Quantity]:
    """Every quantity logged under ``geometry/<layer>/``, in panel order; ``<q>_std`` keys become the spread of
    ``<q>`` and chance-level keys the chance of the quantities in :data:`CHANCE`, not panels of their own."""
    prefix = f"geometry/{layer}/"
    layer_level: dict[str, str] = {}
    per_expert: dict[str, dict[str, str]] = {}
    for column in map(str, history.columns):
        if not column.startswith(prefix):
            continue
        parts = column[len(prefix) :].split("/")
        if len(parts) == 1:
            layer_level[parts[0]] = column
        elif len(parts) == 2 and (parts[1] == "mean" or _EXPERT.fullmatch(parts[1])):
            per_expert.setdefault(parts[0], {})[parts[1]] = column
    names = set(layer_level) | {name for name, columns in per_expert.items() if "mean" in columns}
    quantities = []
    for name in sorted(names - CHANCE_KEYS, key=_order):
        if name.endswith("_std") and name[: -len("_std")] in names:
            continue
        if name in per_expert and "mean" in per_expert[name]:
            value = _logged(history, per_expert[name]["mean"])
            experts = {
                e: s
                for e, column in sorted(per_expert[name].items(), key=lambda item: _expert_index(item[0]))
                if e != "mean" and (s := _logged(history, column)) is not None
            }
            spread = _logged(history, per_expert.get(f"{name}_std", {}).get("mean", ""))
        else:
            value, experts = _logged(history, layer_level[name]), {}
            spread = _logged(history, layer_level.get(f"{name}_std", ""))
        if value is None:
            continue
        quantities.append(Quantity(name, value, experts, spread, _chance(history, prefix, name, value)))
    return quantities


def _expert_index(name: str) -> int:
    match = _EXPERT.fullmatch(name)
    return int(match.group(1)) if match else -1


def _chance(history: pd.DataFrame, prefix: str, name: str, value: pd.Series) -> pd.Series | None:
    level = CHANCE.get(name)
    if level is None:
        return None
    if isinstance(level, float):
        return pd.Series(level, index=value.index)
    return _logged(history, prefix + level)


@dataclass
class SpectrumEvolution:
    """A layer's spectrum at every saved probe: ``values_MS[i, s]`` is σ_{i+1} at ``steps[s]`` (NaN where a probe
    has fewer values)."""

    title: str
    steps: list[int]
    values_MS: np.ndarray


def saved_reports(run: Run) -> list[tuple[int, dict]]:
    """``(step, {layer: GeometryReport})`` of every readable saved probe (``geometry/step_*.json``), by step."""
    loaded = []
    for _step, path in geometry_steps(run.geometry_dir):
        try:
            loaded.append(load_geometry(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file
    return loaded


def _spectrum(report, key: str) -> np.ndarray | None:
    if key == "jac_mean_spectrum":
        return expert_mean_spectrum(report)
    spectrum = report.spectra.get(key)
    return None if spectrum is None or spectrum.numel() == 0 else spectrum.double().numpy().reshape(-1)


def spectrum_evolution(reports: list[tuple[int, dict]]) -> dict[str, list[SpectrumEvolution]]:
    """Layer -> its spectra over training (:data:`SPECTRA`: the Σw-weighted expert mean, the layer Jacobian),
    from :func:`saved_reports`."""
    layers = list(dict.fromkeys(name for _, layers in reports for name in layers))
    found: dict[str, list[SpectrumEvolution]] = {}
    for layer in layers:
        for key, title in SPECTRA:
            columns = [
                (step, s) for step, lay in reports if layer in lay and (s := _spectrum(lay[layer], key)) is not None
            ]
            if not columns:
                continue
            length = max(s.size for _, s in columns)
            values = np.full((length, len(columns)), math.nan)
            for index, (_, spectrum) in enumerate(columns):
                values[: spectrum.size, index] = spectrum
            found.setdefault(layer, []).append(SpectrumEvolution(title, [step for step, _ in columns], values))
    return found


def probe_matrices(reports: list[tuple[int, dict]]) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """Layer -> ``(matrix key, step, E x E matrix)`` of :data:`MATRICES` at the first and at the last probe of
    :func:`saved_reports`."""
    found: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for layer in dict.fromkeys(name for _, layers in reports for name in layers):
        probes = [(step, lay[layer]) for step, lay in reports if layer in lay and lay[layer].num_experts > 1]
        if not probes:
            continue
        ends = [probes[0], probes[-1]] if len(probes) > 1 else probes[:1]
        for key in MATRICES:
            for step, report in ends:
                if key in report.matrices:
                    found.setdefault(layer, []).append((key, step, report.matrices[key].double().numpy()))
    return found


def router_load(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Layer -> each expert's share of the routed assignments by step (``router/<layer>/load/e<i>``; columns
    ``e0 … e{E-1}``, rows the logged steps)."""
    found: dict[str, pd.DataFrame] = {}
    pattern = re.compile(r"router/(.+)/load/(e\d+)")
    columns: dict[str, dict[str, str]] = {}
    for column in map(str, history.columns):
        if match := pattern.fullmatch(column):
            columns.setdefault(match.group(1), {})[match.group(2)] = column
    for layer, experts in columns.items():
        ordered = sorted(experts, key=_expert_index)
        frame = history[[experts[e] for e in ordered]].dropna(how="all")
        if not frame.empty:
            frame.columns = ordered
            found[layer] = frame
    return found


#: Each edge-of-stability threshold drawn in the panel of the sharpness it bounds (docs/geometry.md §7): SGD's
#: ``(2 + 2μ)/η`` against the top Hessian eigenvalue, Adam's ``(2 + 2β₁)/((1 − β₁)η)`` against ``λ₁(P⁻¹H)``.
STABILITY_THRESHOLDS = {
    "sgd_stability_threshold": "hessian_top_eigenvalue",
    "adam_stability_threshold": "preconditioned_top_eigenvalue",
}


def curvature_curves(history: pd.DataFrame) -> dict[str, dict[str, pd.Series]]:
    """Panel -> ``{line: series}`` of every ``curvature/...`` key: numbered keys (``hessian_eigenvalue/<i>``) share
    one panel, one line each; a stability threshold shares the panel of the sharpness it bounds
    (:data:`STABILITY_THRESHOLDS`); every other key is a panel of its own."""
    panels: dict[str, dict[str, pd.Series]] = {}
    for column in map(str, history.columns):
        if not column.startswith("curvature/") or (series := _logged(history, column)) is None:
            continue
        base, _, last = column.rpartition("/")
        if last.isdigit():
            panels.setdefault(base, {})[f"#{int(last) + 1}"] = series
        elif last in STABILITY_THRESHOLDS:
            panels.setdefault(f"{base}/{STABILITY_THRESHOLDS[last]}", {})[last] = series
        else:
            panels.setdefault(column, {})[last] = series
    return panels


def loss_curves(history: pd.DataFrame) -> dict[str, pd.Series]:
    """Every ``train/…`` and ``val/…`` key by step."""
    return {
        str(c): s
        for c in history.columns
        if str(c).startswith(("train/", "val/")) and (s := _logged(history, str(c))) is not None
    }


def geometry_layers(run: Run) -> list[str]:
    """The run's probed layers (from its history's ``geometry/<layer>/tokens_total`` keys)."""
    return [] if run.history is None else layer_names(run.history)
