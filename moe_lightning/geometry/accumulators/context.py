"""What the accumulators of one probe share: the :class:`ProbeContext` (view, config, path), the
:class:`ProbeFailure` of a rank under expert parallelism, and each token :class:`Chunk`, whose expert Jacobians and
Jacobian operators are computed once and used by every quantity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_lightning.geometry.jacobians import expert_jacobian
from moe_lightning.geometry.krylov import TopRResult
from moe_lightning.geometry.operators import JacobianFactors, JacobianOperator, casting_operator
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.statistics import Slot
from moe_lightning.geometry.view import HasJacobianOperator, MoEView, TokenFn

__all__ = ["Chunk", "ProbeContext", "ProbeFailure"]


class ProbeFailure:
    """Under expert parallelism, the first error this rank met in one probe.

    The rank goes on entering the group's collectives (with NaN for what it could not compute), so that no rank waits
    for it, and the probe raises the error at its end (:meth:`raise_if_any`). The one mutable part of a probe's
    context: the :class:`ProbeContext` itself is frozen.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def keep(self, error: Exception) -> None:
        """Keep ``error`` unless an earlier one is kept: the first error is the cause of those that follow."""
        self.error = self.error or error

    def raise_if_any(self) -> None:
        """Raise the kept error, if any."""
        if self.error is not None:
            raise self.error


@dataclass(frozen=True, eq=False)
class ProbeContext:
    """One probe's view, config and path, fixed before the first token.

    The probe builds it in two steps: its accumulators are built against a context without
    ``all_token_jacobians`` and ``replicas``, which depend on the accumulators and the buffer layout they allocate,
    and every chunk gets the whole context made from it with :func:`dataclasses.replace`. An accumulator keeps no
    reference to the context; it reads it from each :class:`Chunk` and in ``close``.

    Attributes:
        view: the layer probed.
        config: the options.
        experts: ``E`` expert functions ``(N, D) -> (N, D)``.
        hidden: ``E`` hidden-activation functions, None where the view does not know them.
        dim: D.
        dtype: computation dtype.
        device: device of the tokens.
        matrix_free: whether the spectra are the matrix-free top-``rank`` values (``D > matrix_free_threshold``).
        rank: ``M``, singular values kept per Jacobian: ``D`` on the exact path, ``r`` on the matrix-free path.
        chunk_size: tokens per chunk (and per matrix-free solver call).
        solve_topr: ``(fn or operator, x[, max_iter, block_size]) -> TopRResult`` with the config's matrix-free
            settings (``max_iter`` in place of ``matrix_free_max_iter``; ``block_size``:
            :func:`~moe_lightning.geometry.topr_singular_values`'s).
        all_token_jacobians: compute each expert's Jacobian on every token of a chunk, not only its routed ones
            (pointwise alignment compares experts token by token).
        replicas: plain slot -> its bootstrap replica (see :class:`~moe_lightning.geometry.statistics.BufferLayout`);
            empty without a bootstrap.
        expert_group: under expert parallelism, the ranks that hold the layer's experts between them; every rank of
            it probes the same tokens, each with its own experts (``local_experts``), and the quantities that need
            every expert at one token are summed or gathered over it (:meth:`sum_over_experts`,
            :meth:`gather_over_experts`). None: every expert is here.
        local_experts: the experts this rank probes (all ``E`` without ``expert_group``).
        failure: where :meth:`guarded` keeps this rank's first error under expert parallelism; shared by the two
            steps of the context.
        factored: on the matrix-free path, whether every expert here offers its Jacobians' factors
            (:class:`~moe_lightning.geometry.JacobianFactors`, through ``expert_jacobian_operator``): their Frobenius
            norms, mean Jacobians and alignment are then exact (docs/geometry.md §1, "Factored experts at any
            width").
        factored_core: ``factored`` and every expert here has rank at most ``H < D``: its whole spectrum comes
            exactly from a small core (:func:`~moe_lightning.geometry.factored.factored_singular_values`).
        factor_width: the largest ``F = G·H`` of the experts' factors (0 when not ``factored``).
        pointwise_factors: on the exact path, whether every expert offers its Jacobians' factors, so that the
            pointwise alignment's inner products come from them
            (:func:`~moe_lightning.geometry.factored.pointwise_cosine_sums_factored`) and no expert's Jacobian is
            formed at the tokens not routed to it.
        products_dtype: on the matrix-free path, the dtype of the products with the Jacobians behind the top-``r``
            values and the estimates of the whole spectrum (``ProbeConfig.matrix_free_products_dtype`` where the
            view casts what it reads, else :attr:`dtype`): :meth:`products_operator`.
        estimate_batch: on the matrix-free path, how many tokens the layer Jacobian's estimates run on at once, as
            the memory budget allows: tokens of several chunks share each product with the weights.
        release: hands the pages the probe has freed back to the operating system
            (:func:`~moe_lightning.common.memory.release_freed_memory`) on the matrix-free path, where the probe
            calls it after each step and a step that reads many experts' weights between its experts; a no-op
            below the threshold.
    """

    view: MoEView
    config: ProbeConfig
    experts: tuple[TokenFn, ...]
    hidden: tuple[TokenFn | None, ...]
    dim: int
    dtype: torch.dtype
    device: torch.device
    matrix_free: bool
    rank: int
    chunk_size: int
    solve_topr: Callable[..., TopRResult]
    expert_group: dist.ProcessGroup | None = None
    local_experts: range | None = None
    all_token_jacobians: bool = False
    replicas: Mapping[Slot, Slot] = field(default_factory=dict)
    failure: ProbeFailure = field(default_factory=ProbeFailure)
    factored: bool = False
    factored_core: bool = False
    factor_width: int = 0
    pointwise_factors: bool = False
    products_dtype: torch.dtype | None = None
    estimate_batch: int = 1
    release: Callable[[], Any] = field(default=lambda: None)

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.experts)

    @property
    def experts_here(self) -> range:
        """The experts whose statistics this rank adds: :attr:`local_experts`, or all of them."""
        return range(self.num_experts) if self.local_experts is None else self.local_experts

    @property
    def is_lead(self) -> bool:
        """Whether this rank adds the statistics of the tokens themselves (dropped tokens); one rank of the expert
        group does, since all of them see the same tokens."""
        return self.expert_group is None or dist.get_rank(self.expert_group) == 0

    def token_share(self, n: int) -> slice:
        """The tokens of a chunk of ``n`` whose layer-level statistics this rank adds: every P-th from its rank in
        the expert group, so that the P ranks, which see the same tokens, count each once and share the work."""
        if self.expert_group is None:
            return slice(0, n)
        return slice(dist.get_rank(self.expert_group), n, dist.get_world_size(self.expert_group))

    def guarded(self, compute: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """``compute()``; under expert parallelism, ``fallback()`` if it raises, the error kept in :attr:`failure`,
        so that this rank still enters the collective that follows."""
        if self.expert_group is None:
            return compute()
        try:
            return compute()
        except Exception as error:
            self.failure.keep(error)
            return fallback()

    @property
    def casts_products(self) -> bool:
        """Whether the matrix-free products round in a dtype other than the probe's (:attr:`products_dtype`)."""
        return self.products_dtype not in (None, self.dtype)

    def expert_factors(self, e: int, x_ND: Tensor) -> JacobianFactors:
        """Expert ``e``'s Jacobian factors at ``x_ND`` (the factored path; an error names the view if it gives
        none)."""
        op = self.expert_operator(e, x_ND)
        if op is None or op.factors is None:
            raise ValueError(
                f"view {self.view.name!r}: expert {e}'s expert_jacobian_operator gives no factors on these "
                "tokens, though it gave them when the probe chose the factored path"
            )
        return op.factors

    def products_operator(
        self, build: Callable[[ProbeContext, Tensor], JacobianOperator], x_ND: Tensor
    ) -> JacobianOperator:
        """``build(ctx, x)``'s Jacobian operator at ``x_ND`` with its products in :attr:`products_dtype`, taking and
        giving :attr:`dtype`: ``build`` is called with this context and ``x_ND`` in that dtype."""
        if not self.casts_products:
            return build(self, x_ND)
        dtype = self.products_dtype
        return casting_operator(build(replace(self, dtype=dtype), x_ND.to(dtype)), self.dtype)

    def nan(self, *shape: int) -> Tensor:
        """A NaN tensor in the probe's dtype: what a rank that failed sends to the group."""
        return torch.full(shape, float("nan"), dtype=self.dtype, device=self.device)

    def sum_over_experts(self, partial: Callable[[], Tensor], shape: tuple[int, ...]) -> Tensor:
        """``partial()`` (this rank's experts' share of a sum over experts, of ``shape``) summed over the expert
        group; NaN where a rank failed to compute its share."""
        if self.expert_group is None:
            return partial()
        value = self.guarded(partial, lambda: self.nan(*shape)).to(self.dtype).contiguous()
        total = value.clone()
        dist.all_reduce(total, group=self.expert_group)
        return self._check_received(value, total)

    def gather_over_experts(self, local_NL: Callable[[], Tensor], shape: tuple[int, ...]) -> Tensor:
        """``(N, L, ...)`` values of this rank's ``L`` experts (``local_NL()``, of ``shape``) -> ``(N, E, ...)`` of
        every expert, by expert index (the group's ranks hold consecutive blocks of experts, in rank order)."""
        if self.expert_group is None:
            return local_NL()
        value = self.guarded(local_NL, lambda: self.nan(*shape)).to(self.dtype).contiguous()
        world = dist.get_world_size(self.expert_group)
        parts = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(parts, value, group=self.expert_group)
        return self._check_received(value, torch.cat(parts, dim=1))

    def _check_received(self, sent: Tensor, received: Tensor) -> Tensor:
        """``received``; where this rank sent finite values and received non-finite ones, another rank of the group
        failed (it sends NaN): kept as this rank's failure, so that its warning says so rather than naming the
        error the NaN would cause further on."""
        if not bool(torch.isfinite(received).all()) and bool(torch.isfinite(sent).all()):
            self.failure.keep(
                RuntimeError(
                    "another rank of the expert group failed in this probe and sent NaN (the warning names its error)"
                )
            )
        return received

    def add_resampled(
        self, buffer: Tensor, slot: Slot, counts_Bn: Tensor | None, values_n: Tensor, index: int | None = None
    ) -> None:
        """Add ``Σ_n counts[b, n] · values[n]`` to row ``b`` of ``slot``'s replica (at ``index`` of its leading
        shape, if given): the slot's sum over bootstrap resample ``b``. Nothing without a replica.

        Args:
            buffer: the statistics buffer.
            slot: the plain slot whose per-token contributions ``values_n`` are.
            counts_Bn: ``(B, n)`` resample counts of the ``n`` tokens.
            values_n: ``(n, ...)`` per-token contributions to ``slot``.
            index: position in the slot's leading shape (an expert); None for the whole slot.
        """
        replica = self.replicas.get(slot)
        if replica is None or counts_Bn is None:
            return
        target = replica.of(buffer)
        if index is not None:
            target = target[:, index]
        target += torch.tensordot(counts_Bn.to(values_n.dtype), values_n, dims=1)

    def expert_operator(self, e: int, x_ND: Tensor) -> JacobianOperator | None:
        """The view's closed-form Jacobian products for the matrix-free path (``expert_jacobian_operator``), if
        any; with ``jacobian_method="closed_form"`` they are required, as the closed-form Jacobian is on the exact
        path."""
        cfg, view = self.config, self.view
        if cfg.jacobian_method == "func":
            return None
        op = view.expert_jacobian_operator(e, x_ND) if isinstance(view, HasJacobianOperator) else None
        if op is None and cfg.jacobian_method == "closed_form":
            raise ValueError(
                f"ProbeConfig.jacobian_method='closed_form' but view {view.name!r} offers no "
                f"expert_jacobian_operator for expert {e}, which the matrix-free path (D > matrix_free_threshold) "
                f"needs; use 'auto' or 'func'"
            )
        return op

    def expert_jacobian(self, e: int, x_ND: Tensor) -> Tensor:
        """``(N, D, D)`` Jacobians of expert ``e`` in :attr:`dtype`, by the method the config asks for."""
        cfg, view = self.config, self.view
        if cfg.jacobian_method == "closed_form" and x_ND.shape[0]:
            J = view.expert_jacobian(e, x_ND)
            if J is None:
                raise ValueError(
                    f"ProbeConfig.jacobian_method='closed_form' but view {view.name!r} offers no "
                    f"expert_jacobian for expert {e}; use 'auto' or 'func'"
                )
        else:
            J = expert_jacobian(
                view,
                e,
                x_ND,
                prefer_closed_form=cfg.jacobian_method != "func",
                memory_budget_bytes=cfg.memory_budget_bytes,
            )
        return J.to(self.dtype)

    def has_closed_form(self) -> bool:
        """Whether the view offers a closed-form expert Jacobian; decided from its capabilities, not the data, so
        it is the same on every rank."""
        probe_x = torch.zeros(1, self.dim, dtype=self.dtype, device=self.device)
        return self.view.expert_jacobian(self.experts_here[0], probe_x) is not None


class Chunk:
    """One chunk of finite tokens with finite gates, and what several quantities compute from it.

    Args:
        ctx: the probe's context.
        x_ND: ``(n, D)`` tokens.
        gates_NE: ``(n, E)`` their gate values.
        counts_Bn: ``(B, n)`` how often each token occurs in each bootstrap resample; None without a bootstrap.
    """

    def __init__(self, ctx: ProbeContext, x_ND: Tensor, gates_NE: Tensor, counts_Bn: Tensor | None = None) -> None:
        self.ctx, self.x, self.gates, self.counts = ctx, x_ND, gates_NE, counts_Bn
        # The tokens routed to each expert: none for the experts another rank probes (expert parallelism).
        here = ctx.experts_here
        self.rows = [
            gates_NE[:, e] > 0 if e in here else torch.zeros_like(gates_NE[:, e], dtype=torch.bool)
            for e in range(ctx.num_experts)
        ]
        self._jacobians: dict[int, Tensor] = {}
        self._all_token_jacobians: dict[int, Tensor] = {}
        self._operators: dict[int, JacobianOperator | None] = {}
        self._all_token_outputs: dict[int, Tensor] = {}

    @property
    def num_tokens(self) -> int:
        """n."""
        return self.x.shape[0]

    def weights(self, e: int) -> Tensor:
        """Gate values ``w = g_e`` of the tokens routed to expert ``e``."""
        return self.gates[self.rows[e], e]

    def counts_of(self, e: int) -> Tensor | None:
        """``(B, n_e)`` resample counts of the tokens routed to expert ``e``; None without a bootstrap."""
        return None if self.counts is None else self.counts[:, self.rows[e]]

    def inputs(self, e: int) -> Tensor:
        """The tokens routed to expert ``e``."""
        return self.x[self.rows[e]]

    def jacobian(self, e: int) -> Tensor:
        """Expert ``e``'s Jacobians at its routed tokens, ``(n_e, D, D)`` (exact path)."""
        if e not in self._jacobians:
            if self.ctx.all_token_jacobians:
                self._jacobians[e] = self.all_token_jacobian(e)[self.rows[e]]
            else:
                self._jacobians[e] = self.ctx.expert_jacobian(e, self.inputs(e))
        return self._jacobians[e]

    def all_token_jacobian(self, e: int) -> Tensor:
        """Expert ``e``'s Jacobians at every token of the chunk, ``(n, D, D)`` (exact path)."""
        if e not in self._all_token_jacobians:
            self._all_token_jacobians[e] = self.ctx.expert_jacobian(e, self.x)
        return self._all_token_jacobians[e]

    def all_token_output(self, e: int) -> Tensor:
        """Expert ``e``'s outputs at every token of the chunk, ``(n, D)`` in :attr:`ProbeContext.dtype`: computed
        once, for the CKA and the layer Jacobian's router term."""
        if e not in self._all_token_outputs:
            self._all_token_outputs[e] = self.ctx.experts[e](self.x).to(self.ctx.dtype)
        return self._all_token_outputs[e]

    def outputs_at(self, e: int, rows_N: Tensor) -> Tensor:
        """Expert ``e``'s outputs at the tokens of the ``(n,)`` mask ``rows_N``, in :attr:`ProbeContext.dtype`:
        taken from :meth:`all_token_output` where that is computed already, else computed at those tokens only."""
        if e in self._all_token_outputs:
            return self._all_token_outputs[e][rows_N]
        return self.ctx.experts[e](self.x[rows_N]).to(self.ctx.dtype)

    def operator(self, e: int) -> JacobianOperator | None:
        """Expert ``e``'s closed-form Jacobian products at its routed tokens (matrix-free path), if the view has
        them; built once per chunk, since a build computes the expert's activations and may cast its weights."""
        if e not in self._operators:
            self._operators[e] = self.ctx.expert_operator(e, self.inputs(e))
        return self._operators[e]

    def factors(self, e: int) -> JacobianFactors:
        """Expert ``e``'s Jacobian factors at its routed tokens (matrix-free path, ``ctx.factored``)."""
        op = self.operator(e)
        if op is None or op.factors is None:
            raise ValueError(
                f"view {self.ctx.view.name!r}: expert {e}'s expert_jacobian_operator gives no factors on these "
                "tokens, though it gave them when the probe chose the factored path"
            )
        return op.factors
