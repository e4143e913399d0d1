"""What a probe of a layer cannot trust: weights that hold NaN/Inf, and probe tokens that reach the layer with NaN/Inf
inputs or gates. Each is an incident of one layer, warned about once when it begins (naming the layer, what holds
NaN/Inf and the step) and once when it ends; meanwhile the layer's values are not logged where they cannot be
trusted, rather than logged as NaN."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.monitors.ranks import rank_zero_warn

_WEIGHTS = "weights"
_INPUTS = "inputs"
_ALL_INPUTS = "all inputs"


class NonFiniteWeights(Exception):
    """A layer's weights hold NaN/Inf: its probe is not run. Raised into the monitor's agreement over ranks as a
    failure of its own kind, so that every rank skips the layer together (expert parallelism and FSDP2 give each rank
    a different part of the weights)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"


def nonfinite_weights(module: nn.Module) -> NonFiniteWeights | None:
    """The error naming ``module``'s floating parameters and buffers that hold NaN/Inf on this rank (of a sharded
    tensor, this rank's part), or None when all are finite."""
    names = []
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            names.append(name)
    return NonFiniteWeights(names) if names else None


def split_failures(failures: dict[int, str]) -> tuple[list[str], dict[int, str]]:
    """``(names of the non-finite weights on any rank, the other failures)`` of an agreement's failures."""
    prefix = f"{NonFiniteWeights.__name__}("
    weights = [m for m in failures.values() if m.startswith(prefix)]
    names = sorted({n for m in weights for n in m[len(prefix) : -1].split(", ") if n})
    return names, {r: m for r, m in failures.items() if not m.startswith(prefix)}


def finite_tensors(obj: Any) -> bool:
    """Whether every floating tensor in ``obj`` (a tensor, or dicts/lists/tuples of them) is finite."""
    if isinstance(obj, Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(finite_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_tensors(v) for v in obj)
    return True


class LayerIncidents:
    """The open incidents of a monitor's layers, ``(layer, kind) -> the step it began``: each warned about once when
    it begins and once when it ends. Every rank keeps the same record (the decisions are agreed); rank zero warns."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.open: dict[tuple[str, str], int] = {}

    def _begin(self, layer: str, kind: str, step: int, message: str) -> None:
        if (layer, kind) not in self.open:
            self.open[(layer, kind)] = step
            rank_zero_warn(f"{self.owner}: {message}")

    def _end(self, layer: str, kind: str, step: int, finite: str, consequence: str) -> None:
        since = self.open.pop((layer, kind), None)
        if since is not None:
            rank_zero_warn(f"{self.owner}: {finite} at step {step} (NaN/Inf since step {since}); {consequence}")

    def weights(self, layer: str, step: int, names: list[str]) -> None:
        """Record the probe of ``layer`` at ``step``: ``names`` are its weights that hold NaN/Inf (none: finite)."""
        if not names:
            self._end(
                layer, _WEIGHTS, step, f"the weights of {layer!r} are finite again", "its values are logged again"
            )
            return
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        self._begin(
            layer,
            _WEIGHTS,
            step,
            f"the weights of {layer!r} hold NaN/Inf at step {step} ({shown}); no values of {layer!r} are logged "
            "until its weights are finite again",
        )

    def inputs(self, layer: str, step: int, dropped: int, kept: int, probe_set_finite: bool) -> None:
        """Record the probe of ``layer`` at ``step``: ``dropped`` probe tokens reached it with NaN/Inf inputs or
        gates and were left out, ``kept`` were probed."""
        if not dropped:
            for kind in (_INPUTS, _ALL_INPUTS):
                finite = f"the probe tokens reach {layer!r} with finite inputs again"
                self._end(layer, kind, step, finite, "every one of them is probed again")
            return
        source = (
            "the probe set itself holds NaN/Inf"
            if not probe_set_finite
            else "the probe set is finite: the model before this layer made them"
        )
        consequence = (
            f"no values of {layer!r} are logged until its inputs are finite again"
            if not kept
            else "they are left out and counted in geometry/<layer>/nonfinite_tokens"
        )
        self._begin(
            layer,
            _INPUTS if kept else _ALL_INPUTS,
            step,
            f"{dropped} of {dropped + kept} probe tokens reach {layer!r} with NaN/Inf inputs or gates at step "
            f"{step} ({source}); {consequence}",
        )
