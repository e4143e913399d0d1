"""Grouped experts: E expert MLPs as two stacked weights, the ways to run them on routed tokens, and each expert as a
pure function for the geometry views.

Shape legend: ``N`` tokens, ``E`` experts, ``L`` experts this rank holds (``E`` without expert parallelism), ``D``
model dim, ``H`` expert hidden width, ``A`` (token, expert) assignments grouped by expert.

``w_in`` is ``(E, D, H)`` (``(E, D, 2H)`` for SwiGLU: gate then up projection) and ``w_out`` is ``(E, H, D)``. That
is the layout ``torch.nn.functional.grouped_mm`` takes as its second operand, so the grouped path needs no per-step
transpose.

Dispatch paths, all giving the loop path's values (tests/test_dispatch.py):
- ``"loop"``: one expert at a time through :meth:`GroupedExperts.expert_fn`, the reference;
- ``"sorted"``: one contiguous matmul per expert over its slice of the assignments;
- ``"grouped"``: every expert in two ``grouped_mm`` calls (torchtitan);
- ``"bmm"``: every expert on every token in one batched matmul per projection (soft routing).

Under expert parallelism (:func:`moe_lightning.distributed.expert_parallel.shard_experts`) the weights are
``DTensor``s sharded over the experts; each rank runs its own ``L`` experts and the assignments travel to them and
back with ``all_to_all_single``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.common import check_choice, check_positive, warn_once
from moe_lightning.distributed.expert_parallel import plan_exchange
from moe_lightning.nn.config import ACTIVATIONS

__all__ = ["GroupedExperts", "auto_sparse_dispatch"]


def activate(h: Tensor, activation: str) -> Tensor:
    """The expert nonlinearity on pre-activations ``h``; SwiGLU reads gate then up halves of the last dim."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether ``grouped_mm`` takes inputs ``x`` and weights ``w``: float32/bf16/fp16, 16-byte aligned strides."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all((s * x.element_size()) % 16 == 0 for s in (x.shape[-1], w.shape[-1]))


def auto_sparse_dispatch(device: torch.device) -> str:
    """The sparse dispatch ``dispatch="auto"`` uses on ``device``: ``grouped_mm`` on CUDA, the sorted per-expert
    matmuls on CPU, where they beat ``grouped_mm`` (docs/benchmarks/dispatch.md)."""
    return "grouped" if device.type == "cuda" else "sorted"


# Messages of dispatch fallbacks already warned about: a fallback runs on every forward pass.
_warned_fallback: set[str] = set()


class GroupedExperts(nn.Module):
    """E expert MLPs ``x -> act(x W_in[e]) W_out[e]`` stored as stacked weights, and their dispatch paths.

    The base of :class:`~moe_lightning.nn.layer.MoELayer` (the experts behind a router) and of
    :class:`~moe_lightning.nn.layer.DenseFFN` (one expert), whose weights are therefore their own parameters
    (``w_in``, ``w_out``, the state-dict keys checkpoints hold). It has no ``forward``: the layers route tokens and
    call :meth:`run_experts` or :meth:`run_every_expert`.

    Under expert parallelism this rank holds experts :attr:`local_experts` (the local shards of ``DTensor``
    weights); ``expert_group`` is the process group that holds them all, and ``all_weights`` every expert's weights
    while :func:`~moe_lightning.distributed.expert_parallel.gather_experts` lends them. Both are None otherwise.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        for field, value in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
            check_positive(field, value)
        self.num_experts, self.activation = num_experts, activation
        width_in = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width_in))  # (E, D, H) or (E, D, 2H) for SwiGLU
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, H, D)
        nn.init.normal_(self.w_in, std=dim**-0.5)
        nn.init.normal_(self.w_out, std=hidden**-0.5)
        self.expert_group: dist.ProcessGroup | None = None
        self.all_weights: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ this rank's experts
    @property
    def expert_parallel_size(self) -> int:
        """P, the ranks the experts are split over (1 without expert parallelism)."""
        return 1 if self.expert_group is None else dist.get_world_size(self.expert_group)

    @property
    def local_experts(self) -> range:
        """The global indices of the experts this rank holds (all E without expert parallelism, or while
        ``all_weights`` is lent)."""
        if self.all_weights is not None:
            return range(self.num_experts)
        size = self.expert_parallel_size
        per_rank = self.num_experts // size
        start = 0 if size == 1 else dist.get_rank(self.expert_group) * per_rank
        return range(start, start + per_rank)

    def local_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(w_in, w_out)`` of this rank's experts, ``(L, D, H)`` and ``(L, H, D)``, cast to ``dtype``; the
        autograd graph reaches the parameters (their local shards under expert parallelism)."""
        w_in, w_out = self.w_in, self.w_out
        if self.all_weights is not None:
            w_in, w_out = self.all_weights
        elif hasattr(w_in, "to_local"):
            w_in, w_out = w_in.to_local(), w_out.to_local()
        return w_in.to(dtype or w_in.dtype), w_out.to(dtype or w_out.dtype)

    def local_index(self, e: int) -> int:
        """Where expert ``e`` (a global index) sits among this rank's experts; a ``ValueError`` for another rank's."""
        local = self.local_experts
        if e not in local:
            raise ValueError(f"expert {e} is not on this rank, which holds experts {local.start}..{local.stop - 1}")
        return e - local.start

    # Expert e as a pure function, used by the loop path and by the geometry views; e is a global index of one of
    # this rank's experts (local_experts). Only expert e's slice is cast to the input's dtype.
    def expert_hidden_fn(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e's inner activation (N, H), after the nonlinearity."""
        w_in = self.local_weights()[0][self.local_index(e)]
        return activate(x_ND @ w_in.to(x_ND.dtype), self.activation)

    def expert_fn(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e's output (N, D)."""
        w_out = self.local_weights()[1][self.local_index(e)]
        return self.expert_hidden_fn(e, x_ND) @ w_out.to(x_ND.dtype)

    # ------------------------------------------------------------------ dispatch
    def run_every_expert(self, x_ND: Tensor, gates_NE: Tensor) -> Tensor:
        """Soft routing (``"bmm"``): every expert on every token through one batched matmul per projection, the
        outputs summed with weights ``gates_NE``."""
        x_END = x_ND.unsqueeze(0).expand(self.num_experts, -1, -1)
        h_ENH = activate(torch.bmm(x_END, self.w_in.to(x_ND.dtype)), self.activation)
        y_END = torch.bmm(h_ENH, self.w_out.to(h_ENH.dtype))
        return torch.einsum("end,ne->nd", y_END, gates_NE.to(y_END.dtype))

    def run_experts(self, dispatch: str, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """The experts on assignment rows grouped by (global) expert, ``counts_E`` rows each: ``(A, D) -> (A, D)``.

        Under expert parallelism the rows go to their experts' ranks, run there, and come back in the same order.
        ``dispatch`` is ``"loop"``, ``"sorted"`` or ``"grouped"``; ``"grouped"`` falls back to ``"sorted"``, with
        one warning, where ``grouped_mm`` does not take the inputs.
        """
        if dispatch == "grouped" and not grouped_mm_available(x_AD, self.w_in):
            warn_once(
                f"MoELayer: dispatch='grouped' is unavailable for dtype {x_AD.dtype} / dim {x_AD.shape[-1]} "
                "(torch.nn.functional.grouped_mm needs float32/bf16 and 16-byte aligned rows); using 'sorted'",
                _warned_fallback,
            )
            dispatch = "sorted"
        if self.expert_group is None:
            return self._run_local(dispatch, x_AD, counts_E)
        exchange = plan_exchange(counts_E, self.expert_group)
        return exchange.combine(self._run_local(dispatch, exchange.dispatch(x_AD), exchange.local_counts))

    def _run_local(self, dispatch: str, x_AD: Tensor, counts_L: Tensor) -> Tensor:
        """This rank's experts on rows grouped by local expert, ``counts_L`` rows each."""
        if dispatch == "loop":
            return self._run_loop(x_AD, counts_L)
        if dispatch == "sorted":
            return self._run_sorted(x_AD, counts_L)
        return self._run_grouped(x_AD, counts_L)

    def _run_loop(self, x_AD: Tensor, counts_L: Tensor) -> Tensor:
        """Reference path: one expert at a time, slicing the stacked weights (``W[e]``)."""
        outputs, start = [], 0
        for e, count in zip(self.local_experts, counts_L.tolist(), strict=True):
            outputs.append(self.expert_fn(e, x_AD[start : start + count]))
            start += count
        return torch.cat(outputs) if outputs else x_AD

    def _run_sorted(self, x_AD: Tensor, counts_L: Tensor) -> Tensor:
        """One contiguous matmul per expert over its slice of the sorted assignments.

        The weights are unbound once, so backward stacks the experts' gradient slices into one buffer instead of
        allocating a full-size ``(E, D, H)`` gradient per ``W[e]`` slice.
        """
        splits = counts_L.tolist()
        w_in, w_out = (w.unbind(0) for w in self.local_weights(x_AD.dtype))
        outputs = [activate(chunk @ w_in[e], self.activation) @ w_out[e] for e, chunk in enumerate(x_AD.split(splits))]
        return torch.cat(outputs)

    def _run_grouped(self, x_AD: Tensor, counts_L: Tensor) -> Tensor:
        """All experts in two ``grouped_mm`` calls over the sorted assignments, int32 offsets (torchtitan)."""
        offsets_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
        w_in, w_out = self.local_weights(x_AD.dtype)
        h_AH = activate(F.grouped_mm(x_AD, w_in, offs=offsets_L), self.activation)
        return F.grouped_mm(h_AH.contiguous(), w_out, offs=offsets_L)
