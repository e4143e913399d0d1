"""Checking a layer's views before trusting them: :func:`verify_view` runs the layer itself on the tokens it was
captured on and tells whether the views describe it (docs/adapters.md "How a view is checked").

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim.

The probes measure ``y(x) = Σ_e g_e(x) f_e(x)``, token by token, through the views. Three things must hold for that
to be the layer's own map, and each is checked on the captured tokens, in this order:

1. **determinism**: two forwards of the layer agree (a layer that draws its routing at random, as fairscale's
   second expert does even in eval mode, has no map to measure);
2. **per-token**: the layer's output for one token does not depend on the other tokens: the tokens run in two
   halves, and in reverse order, give the same outputs as all of them at once (Soft MoE's slots, expert-choice
   routing and capacity limits that drop tokens couple tokens; the per-token Jacobian is not defined for them);
3. **reconstruction**: the gated sum of the views' experts (every view of the layer: routed and shared experts),
   computed as the probe computes it (in the probe dtype, on cast copies of the weights), equals the layer's
   output.

Each miss is ``max |a - b| / max |layer output|``, relative to the output's own size, so that a small freshly
initialised layer is held to the same standard as any other. The tolerance follows the dtype of the layer's output
(:data:`TOLERANCE`): a faithful view differs from the layer only by the layer's rounding (different summation
order, grouped kernels), a few units of its machine epsilon times the growth of a D-term sum, 1e-6 relative in
float32 for the layer sizes this project probes, while a wrong view misses by the size of a gate or an expert
output, 1e-2 and more. The float32 tolerance, 1e-4, sits between the two with two orders of margin on each side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lightning.common import dtype_name, observation
from moe_lightning.geometry.lending import lent_modules, with_cast_copies
from moe_lightning.geometry.view import CastsOnRead, ExpertPlacement, HasPlacement, MoEView

__all__ = ["CHECKS", "TOLERANCE", "ViewCheck", "layer_output", "verify_view"]

#: The checks, in the order they run.
CHECKS = ("determinism", "per-token", "reconstruction")

#: Largest relative miss allowed, by the dtype of the layer's output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}

# Tokens the check runs on, at most: enough to see capacity limits and token coupling, few enough to cost little.
MAX_CHECK_TOKENS = 512

_WHY = {
    "determinism": "two forwards of the layer on the same tokens disagree (random routing?), so no deterministic "
    "view can describe it",
    "per-token": "the layer's output for a token depends on the other tokens (token-coupled routing such as Soft "
    "MoE slots or expert-choice, or a capacity limit that drops tokens); the per-token Jacobian is not defined "
    "for it",
    "reconstruction": "the views' gated sum of experts is not the layer's output (wrong gates, a missing shared "
    "expert, or a view whose module is not the MoE block)",
}


@dataclass(frozen=True)
class ViewCheck:
    """What :func:`verify_view` found.

    Attributes:
        layer: the name(s) of the views checked, comma-separated.
        failed: the first check that failed (one of :data:`CHECKS`), or None when all passed.
        miss: the relative miss of the failed check; when all passed, the largest miss of the three.
        tolerance: the largest relative miss allowed.
        detail: how the failed check was run, or the error that stopped it.
        stopped: whether an error stopped the check (then ``miss`` is NaN and ``detail`` the error).
    """

    layer: str
    failed: str | None
    miss: float
    tolerance: float
    detail: str = ""
    stopped: bool = False

    @property
    def passed(self) -> bool:
        return self.failed is None

    def message(self) -> str:
        """One line: the layer, the check, the size of the miss and why it matters; empty when it passed."""
        if self.passed:
            return ""
        if not math.isfinite(self.miss):
            return f"the view of {self.layer!r} could not be checked (its {self.failed} check stopped: {self.detail})"
        return (
            f"the view of {self.layer!r} fails the {self.failed} check (relative miss {self.miss:.3g} > tolerance "
            f"{self.tolerance:.0e}, {self.detail}): {_WHY[self.failed]}"
        )


_NOT_THE_BLOCK = "a view's module must be the MoE block, whose output has the tokens' shape"


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    for item in output if isinstance(output, (list, tuple)) else ():
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"the layer returned {type(output).__name__}, which holds no tensor; {_NOT_THE_BLOCK}")


def layer_output(module: nn.Module, x_ND: Tensor) -> Tensor:
    """The layer's own output on the tokens ``x_ND``, as ``(N, D)``: called as one sequence ``(1, N, D)`` (what
    transformer blocks expect), else as ``(N, D)``; its first tensor output."""
    try:
        out = _first_tensor(module(x_ND.unsqueeze(0)))
    except Exception:
        out = _first_tensor(module(x_ND))
    if out.numel() != x_ND.numel():
        raise ValueError(
            f"the layer ({type(module).__name__}) returned shape {tuple(out.shape)} for {x_ND.shape[0]} tokens of "
            f"width {x_ND.shape[-1]}; {_NOT_THE_BLOCK}"
        )
    return out.reshape(x_ND.shape)


def _miss(got: Tensor, want: Tensor, scale: float) -> float:
    return float((got.double() - want.double()).abs().max()) / scale if got.numel() else 0.0


def _gated_sum(view: MoEView, x_ND: Tensor, experts: range | None = None) -> Tensor:
    """``Σ_e g_e(x) f_e(x)`` over ``experts`` (default all), each expert run on the tokens routed to it."""
    total = torch.zeros_like(x_ND)
    gates_NE = view.gates(x_ND).to(x_ND.dtype)
    for e in torch.nonzero(gates_NE.abs().sum(0)).flatten().tolist():
        if experts is None or e in experts:
            rows = gates_NE[:, e] != 0
            total[rows] += gates_NE[rows, e : e + 1] * view.expert(e)(x_ND[rows])
    return total


def _sharded_gated_sum(view: MoEView, x_ND: Tensor, placement: ExpertPlacement) -> Tensor:
    """The gated sum of a layer whose experts expert parallelism splits over ``placement.group``, without gathering
    any expert: the group's tokens are gathered (they are few), each rank adds its own experts' terms for all of
    them, one all-reduce sums the terms, and each rank keeps its tokens' rows. Every rank of the group calls it."""
    group = placement.group
    sizes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, x_ND.shape[0], group=group)
    padded = x_ND.new_zeros(max(sizes), x_ND.shape[1])
    padded[: x_ND.shape[0]] = x_ND
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    tokens = torch.cat([block[:n] for block, n in zip(gathered, sizes, strict=True)])
    try:
        terms, error = _gated_sum(view, tokens, placement.local_experts), None
    except Exception as caught:  # every rank still enters the all-reduce; this rank's error fails its check after
        terms, error = torch.zeros_like(tokens), caught
    dist.all_reduce(terms, group=group)
    if error is not None:
        raise error
    start = sum(sizes[: dist.get_rank(group)])
    return terms[start : start + x_ND.shape[0]]


def _views_sum(views: Sequence[MoEView], x_ND: Tensor) -> Tensor:
    """``Σ_views Σ_e g_e(x) f_e(x)``; a view whose experts expert parallelism splits sums them over its group."""
    total = torch.zeros_like(x_ND)
    for view in views:
        placement = view.placement() if isinstance(view, HasPlacement) else None
        sharded = placement is not None and dist.is_initialized() and dist.get_world_size(placement.group) > 1
        total += _sharded_gated_sum(view, x_ND, placement) if sharded else _gated_sum(view, x_ND)
    return total


def _checks(views: Sequence[MoEView], x_ND: Tensor, dtype: torch.dtype | None) -> list[tuple[str, Callable]]:
    """The checks as ``(name, run)``; ``run() -> (got, want, how it was run)``. The views' gated sum is computed
    before the layer runs at all: a sharded layer (FSDP2) gives its gathered weights back at the end of its own
    forward, after which the views would read shards. Under expert parallelism no expert is gathered: each rank
    sums its own experts' terms (:func:`_sharded_gated_sum`)."""
    module = views[0].module
    state: dict[str, Any] = {}
    x = x_ND if dtype is None else x_ND.to(dtype)
    # as in the probe: views that cast what they read are lent no copy of the whole layer
    lend = None if all(isinstance(v, CastsOnRead) and v.casts_weights_on_read() for v in views) else dtype
    try:
        state["sum"] = with_cast_copies(lent_modules(views), lend, lambda: _views_sum(views, x))
    except Exception as error:  # reported by the reconstruction check, in its turn
        state["sum"] = error

    def determinism() -> tuple[Tensor, Tensor, str]:
        state["out"] = layer_output(module, x_ND)
        return layer_output(module, x_ND), state["out"], "two forwards on the same tokens"

    def per_token() -> tuple[Tensor, Tensor, str]:
        half = x_ND.shape[0] // 2
        split = torch.cat([layer_output(module, x_ND[:half]), layer_output(module, x_ND[half:])])
        flipped = layer_output(module, x_ND.flip(0)).flip(0)
        got = torch.cat([split, flipped])
        return got, torch.cat([state["out"], state["out"]]), "the tokens run in two halves and in reverse order"

    def reconstruction() -> tuple[Tensor, Tensor, str]:
        if isinstance(state["sum"], Exception):
            raise state["sum"]
        return state["sum"], state["out"], f"the views' gated sum in {dtype_name(x.dtype)}"

    return [("determinism", determinism), ("per-token", per_token), ("reconstruction", reconstruction)]


def verify_view(views: MoEView | Sequence[MoEView], x: Tensor, dtype: torch.dtype | None = None) -> ViewCheck:
    """Check that ``views`` (every view of one MoE layer: its routed experts, and its shared experts where they have
    views of their own) describe the layer on the tokens ``x`` (its captured input, ``(N, D)`` or ``(..., D)``).

    Runs :data:`CHECKS` in order and stops at the first that fails. The layer runs inside
    :func:`~moe_lightning.common.observation` (eval mode, no grad; its modes, buffers and the random states restored
    afterwards), and the views read cast copies of the weights, so nothing training sees changes. An error from the
    layer or a view fails the check it stopped. Uses the first :data:`MAX_CHECK_TOKENS` tokens that hold no NaN/Inf.

    Args:
        views: one view, or every view of one layer (all with the same ``module``).
        x: the layer's input tokens.
        dtype: the dtype the probe computes in (the views run in it on cast copies of the weights, as in
            :func:`~moe_lightning.geometry.probe`); None runs them in the layer's own.

    Returns:
        A :class:`ViewCheck`; ``check.message()`` is the one-line warning for a view that failed.
    """
    views = [views] if isinstance(views, MoEView) else list(views)
    if not views or any(v.module is not views[0].module for v in views):
        raise ValueError("verify_view: give one or more views of one layer (all with the same module)")
    names = ", ".join(str(v.name) for v in views)
    x_ND = x.detach().reshape(-1, x.shape[-1])
    x_ND = x_ND[torch.isfinite(x_ND).all(-1)][:MAX_CHECK_TOKENS]  # as the probe, which leaves non-finite tokens out
    module = views[0].module
    out_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), x_ND.dtype)
    tolerance = TOLERANCE.get(out_dtype, 1e-4)
    if x_ND.shape[0] < 2:
        return ViewCheck(
            names, "per-token", math.nan, tolerance, f"{x_ND.shape[0]} finite token(s); the check needs two", True
        )
    worst = 0.0
    with observation(module):
        for check, run in _checks(views, x_ND, dtype):
            try:
                got, want, how = run()
                tolerance = TOLERANCE.get(want.dtype, tolerance)
                miss = _miss(got, want, max(float(want.double().abs().max()), torch.finfo(torch.float64).tiny))
            except Exception as error:  # a layer or view that cannot run fails the check it stopped
                return ViewCheck(names, check, math.nan, tolerance, f"{type(error).__name__}: {error}", True)
            if not miss <= tolerance:  # NaN fails too
                return ViewCheck(names, check, miss, tolerance, how)
            worst = max(worst, miss)
    return ViewCheck(names, None, worst, tolerance)
