"""The geometry probe's probe set: the fixed token set every probe of a run reads, drawn once from the data, batch by
batch in the loader's own order, so it is the same on every rank and in every run; and the part of its bootstrap
resamples that belongs to the tokens a rank probes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.geometry import MoEView, ProbeConfig
from moe_lightning.geometry.bootstrap import resample_counts
from moe_lightning.monitors.ranks import rank_zero_warn


def model_device(model: nn.Module) -> torch.device:
    """The device the model runs on: its ``device`` (Lightning and Hugging Face modules have one), else its first
    parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def batch_inputs(batch: Any, input_key: str | int = 0) -> Any:
    """The model input of a batch: ``batch[input_key]`` of a tuple/list/dict, or the batch itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch[input_key if isinstance(input_key, str) else "input_ids"]
    if isinstance(batch, (list, tuple)):
        return batch[input_key if isinstance(input_key, int) else 0]
    raise ValueError(f"cannot take model inputs from a batch of type {type(batch).__name__}; pass input_key")


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of a batch (tensors, or dicts/lists/tuples of them), for a monitor's state."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def probe_loader(datamodule: Any, source: str) -> Any:
    """The dataloader the probe set comes from: the datamodule's validation loader for ``source="val"`` (its
    training loader when it has none), its training loader for ``"train"``; the first of a list of loaders; None
    without a datamodule or a loader."""
    if datamodule is None:
        return None
    order = ("val_dataloader", "train_dataloader") if source == "val" else ("train_dataloader",)
    for name in order:
        try:
            loader = getattr(datamodule, name)()
        except Exception:  # not implemented (Lightning raises MisconfigurationException): try the next one
            continue
        if loader is not None and (not isinstance(loader, (list, tuple)) or len(loader) > 0):
            return loader[0] if isinstance(loader, (list, tuple)) else loader
    return None


def draw_probe_set(
    loader: Any,
    views: list[MoEView],
    capture: Callable[[list[Any]], dict[str, Tensor]],
    input_key: str | int,
    max_tokens: int,
    min_tokens_per_expert: int | None,
) -> list[Any]:
    """CPU copies of the model inputs of ``loader``'s batches, in its order, until every layer of ``views`` has
    ``max_tokens`` captured tokens (``capture(inputs)`` gives each layer's inputs) or, with
    ``min_tokens_per_expert``, until every expert's ``n_eff`` reaches it within ``max_tokens``; a warning names the
    expert that falls short."""
    inputs: list[Any] = []
    tokens = 0
    target = min_tokens_per_expert
    # per layer: Σw and Σw² of each expert's gate values over the tokens drawn so far (within the budget)
    sums: dict[str, tuple[Tensor, Tensor]] = {}
    for batch in loader:
        inputs.append(cpu_copy(batch_inputs(batch, input_key)))
        captured = capture(inputs[-1:])
        if target is not None:
            _add_gate_sums(sums, views, captured, max_tokens - tokens)
        tokens += min(x.shape[0] for x in captured.values())
        if tokens >= max_tokens or (target is not None and _lowest_n_eff(sums)[0] >= target):
            break
    if target is not None:
        lowest, where = _lowest_n_eff(sums)
        if lowest < target:
            rank_zero_warn(
                f"GeometryMonitor: the probe set of {min(tokens, max_tokens)} tokens (max_tokens={max_tokens}) "
                f"leaves {where} with n_eff = {lowest:.1f} < min_tokens_per_expert={target}; raise max_tokens (or "
                "add validation data): its PCA values are flagged undersampled when n_eff is below their width"
            )
    return inputs


def bootstrap_columns(config: ProbeConfig, num_tokens: int, world: int, ranks: list[int]) -> Tensor | None:
    """The columns of the bootstrap's draw over the ``num_tokens`` of the probe set (None without a bootstrap)
    that belong to the tokens of ``ranks``, the probe set being split over ``world`` ranks: the resamples do not
    depend on how many ranks share the tokens."""
    if not config.bootstrap:
        return None
    counts = resample_counts(num_tokens, config.bootstrap, config.bootstrap_seed)
    return torch.cat([counts.tensor_split(world, dim=1)[r] for r in ranks], dim=1) if world > 1 else counts


def _add_gate_sums(
    sums: dict[str, tuple[Tensor, Tensor]], views: list[MoEView], captured: dict[str, Tensor], room: int
) -> None:
    """Add each layer's gate sums ``Σw``, ``Σw²`` per expert over the first ``room`` captured tokens."""
    for view in views:
        x = captured[view.name]
        x = x.reshape(-1, x.shape[-1])[: max(room, 0)]
        g = view.gates(x).detach().to(torch.float64)
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        sum_w, sum_w2 = sums.get(view.name, (0.0, 0.0))
        sums[view.name] = (sum_w + g.sum(0), sum_w2 + (g * g).sum(0))


def _lowest_n_eff(sums: dict[str, tuple[Tensor, Tensor]]) -> tuple[float, str]:
    """The smallest effective sample size ``(Σw)²/Σw²`` over every layer's experts, and which expert it is."""
    lowest, where = math.inf, "no expert"
    for name, (sum_w, sum_w2) in sums.items():
        n_eff = torch.where(sum_w2 > 0, sum_w**2 / torch.where(sum_w2 > 0, sum_w2, 1.0), 0.0)
        e = int(n_eff.argmin())
        if float(n_eff[e]) < lowest:
            lowest, where = float(n_eff[e]), f"expert {e} of {name!r}"
    return lowest, where
