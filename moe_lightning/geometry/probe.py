"""``probe(view, x)``: the docs/geometry.md §1–5 quantities of one MoE layer on a set of captured layer inputs,
computed by one accumulator per quantity (:mod:`moe_lightning.geometry.accumulators`) on one flat buffer.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width, ``S`` spectral statistics
(:data:`~moe_lightning.geometry.spectra.SPECTRAL_STAT_NAMES`), ``M`` singular values kept per Jacobian
(``D`` on the exact path, ``r`` on the matrix-free path), ``R`` subspace rank.

The probe is two-phase so that DDP is exact (additive sums, as for the PCA moments of docs/geometry.md §3):

1. :func:`probe_statistics` turns this rank's tokens into *additive* sufficient statistics: ``Σw``, ``Σw²``,
   token counts, ``Σw·stat``, ``Σw·stat²``, ``Σw·σ`` (mean spectrum), ``Σw·J`` (mean Jacobian ``J̄_e``),
   ``Σw x`` and ``Σw x xᵀ`` per PCA site, ``Σ|cos|`` with counts for pointwise alignment, and ``Σ f_e`` with
   ``Σ f_i f_jᵀ`` for CKA. Each accumulator allocates its slots of the buffer, then adds every chunk of tokens
   into them.
2. :meth:`ProbeStatistics.reduce` sums them across ranks with one ``reduce_fn`` call on the flat buffer, whose
   length depends only on the view's shapes and the config, never on the data (an expert without tokens on a rank
   contributes zeros), so every rank makes the same collective call.
3. :func:`finalize` turns the summed statistics into a :class:`GeometryReport`, each accumulator writing its
   quantity.

A new quantity is one new accumulator, built in :func:`_accumulators`.

Probing disjoint shards and summing their statistics gives the one-process result on the union, up to float
summation order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.common import restored_modes
from moe_lightning.geometry.accumulators import (
    Accumulator,
    Alignment,
    Chunk,
    ExpertCKA,
    ExpertSpectra,
    FactoredMeanJacobian,
    LayerJacobian,
    MeanJacobian,
    NotComputed,
    PCAMoments,
    ProbeContext,
    SkippedForOneExpert,
    Subspaces,
    TokenCounts,
)
from moe_lightning.geometry.alignment import sampled_pairs
from moe_lightning.geometry.bootstrap import bootstrap_values, probe_resample_counts
from moe_lightning.geometry.lending import lent_modules, with_cast_copies
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.probe_plan import probe_context
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout, ProbeStatistics
from moe_lightning.geometry.view import CastsOnRead, MoEView, check_view

__all__ = ["finalize", "probe", "probe_statistics"]


@contextmanager
def _observation(module: nn.Module | None, cfg: ProbeConfig) -> Iterator[None]:
    """No grad and eval mode (every submodule's mode restored afterwards)."""
    with restored_modes(module, eval_mode=cfg.eval_mode), torch.no_grad():
        yield


def _accumulators(ctx: ProbeContext) -> tuple[TokenCounts, list[Accumulator]]:
    """The token counts and the accumulators of the quantities ``ctx.config`` asks for, in report order (an
    accumulator comes after those it uses)."""
    cfg, num_experts, d = ctx.config, ctx.num_experts, ctx.dim
    multi, exact = num_experts > 1, cfg.jacobian and not ctx.matrix_free
    tokens = TokenCounts(num_experts)
    quantities: list[Accumulator] = []
    if cfg.jacobian:
        share = cfg.layer_jacobian and cfg.layer_jacobian_method != "func"
        quantities.append(ExpertSpectra(ctx, tokens, share_operators=share))
    if cfg.layer_jacobian:
        quantities.append(LayerJacobian(tokens, ctx.rank, ctx.matrix_free, cfg, ctx.products_dtype))
    pca = None
    if cfg.pca or (cfg.subspaces and multi):
        sites = list(cfg.pca_sites) if cfg.pca else []
        if cfg.subspaces and multi and "input" not in sites:
            sites.append("input")
        pca = PCAMoments(ctx, tokens, sites, reported=cfg.pca_sites if cfg.pca else ())
        quantities.append(pca)
    mean_jacobian: MeanJacobian | FactoredMeanJacobian | None = None
    if multi and (cfg.alignment or cfg.subspaces):
        if exact:
            mean_jacobian = MeanJacobian(num_experts, d)
        elif cfg.jacobian and ctx.factored and ctx.expert_group is None:
            # Factored experts: exact at any D (docs/geometry.md §1). Under expert parallelism a rank holds only its
            # experts' weights, which the cross-expert quantities need at once: those stay unreported there.
            mean_jacobian = FactoredMeanJacobian(ctx, tokens)
    if mean_jacobian is not None:
        quantities.append(mean_jacobian)
    if multi and (cfg.alignment or cfg.subspaces) and cfg.jacobian and ctx.matrix_free and not ctx.factored:
        _warn_no_cross_expert_estimates(ctx)
        quantities.append(NotComputed(("align", "subspace_fun"), "unavailable_matrix_free_without_factors"))
    if not multi:
        quantities.append(SkippedForOneExpert("align"))
    elif cfg.alignment and mean_jacobian is not None:
        pairs = sampled_pairs(num_experts, cfg.pointwise_alignment_pairs, cfg.seed)
        # On a sample of the pairs the mean is an estimate with its standard error over pairs: the Grams' products
        # round in the matrix-free products' dtype, their error far below it (docs/geometry.md §4).
        sampled = pairs is not None and ctx.casts_products
        alignment = Alignment(
            mean_jacobian,
            num_experts,
            d,
            cfg.pointwise_alignment,
            ctx.pointwise_factors,
            pairs,
            gram_dtype=ctx.products_dtype if sampled else None,
        )
        quantities.append(alignment)
    if not multi:
        quantities.append(SkippedForOneExpert("cka"))
    elif cfg.cka:
        # Σ f_i f_jᵀ holds E² D × D blocks; bounded as PCA bounds its one D × D moment per site.
        too_large = num_experts * num_experts * d * d > cfg.pca_max_dim**2
        quantities.append(ExpertCKA(num_experts, d, too_large))
    if not multi:
        quantities.append(SkippedForOneExpert("subspaces"))
    elif cfg.subspaces:
        quantities.append(Subspaces(tokens, mean_jacobian, pca, min(cfg.subspace_rank, d), d))
    return tokens, quantities


def _warn_no_cross_expert_estimates(ctx: ProbeContext) -> None:
    """Say why an expert known only as a function gets no alignment and no functional subspaces above the
    matrix-free threshold (docs/geometry.md §1, "Estimated quantities"); Python shows it once per layer."""
    warnings.warn(
        f"probe of {ctx.view.name!r}: D = {ctx.dim} is above ProbeConfig.matrix_free_threshold and the view gives no "
        "factors of its experts' Jacobians (expert_jacobian_operator with JacobianFactors), so the Jacobian "
        "alignment and the functional subspaces are not reported. Estimating them from probes cannot be trusted: "
        "with K probes the noise of a cosine is about (2 / (K·D))^½, far above its chance level of about 0.8 / D, "
        "so |cos| would measure the noise, and resolving it takes about D probes, the cost of forming J.",
        RuntimeWarning,
        stacklevel=4,
    )


def _chunks(
    ctx: ProbeContext, x_ND: Tensor, tokens: TokenCounts, buffer: Tensor, counts_BN: Tensor | None
) -> Iterator[Chunk]:
    """The finite tokens of ``x_ND`` with finite gates, ``chunk_size`` at a time, with their bootstrap counts;
    dropped tokens are counted."""
    finite_N = torch.isfinite(x_ND).all(-1)
    if ctx.is_lead:  # under expert parallelism every rank of the group sees these tokens: one counts them
        tokens.add_nonfinite(buffer, ~finite_N)
    x_valid = x_ND[finite_N]
    c_valid = None if counts_BN is None else counts_BN[:, finite_N]
    for start in range(0, x_valid.shape[0], ctx.chunk_size):
        x_c = x_valid[start : start + ctx.chunk_size]
        c_c = None if c_valid is None else c_valid[:, start : start + ctx.chunk_size]
        g_cE = ctx.view.gates(x_c).to(ctx.dtype)
        ok = torch.isfinite(g_cE).all(-1)
        if not bool(ok.all()):
            if ctx.is_lead:
                tokens.add_nonfinite(buffer, ~ok)
            x_c, g_cE = x_c[ok], g_cE[ok]
            c_c = None if c_c is None else c_c[:, ok]
        if x_c.shape[0]:
            yield Chunk(ctx, x_c, g_cE, c_c)


def probe_statistics(
    view: MoEView,
    x: Tensor,
    config: ProbeConfig | None = None,
    *,
    resample_counts: Tensor | None = None,
    expert_group: Any = None,
    local_experts: range | None = None,
) -> ProbeStatistics:
    """Phase 1 of :func:`probe`: this rank's additive statistics for one MoE layer.

    Args:
        view: the layer, as an :class:`~moe_lightning.geometry.view.MoEView` (``name``, ``module``,
            ``num_experts``, ``gates``, ``expert``, ``expert_hidden``, ``expert_jacobian``).
        x: ``(N, D)`` (or ``(..., D)``) captured layer inputs; rows with NaN/Inf are dropped and counted.
        config: options; defaults to ``ProbeConfig()``.
        resample_counts: with ``config.bootstrap = B > 0``, the ``(B, N)`` counts of this rank's ``N`` tokens in
            each resample: under DDP the columns of one draw over the global probe set
            (:func:`~moe_lightning.geometry.bootstrap.resample_counts`) that belong to this rank's tokens. None
            draws them over ``x`` alone, with ``config.bootstrap_seed``.
        expert_group: under expert parallelism, the process group whose ranks hold the layer's experts between
            them, each probing ``local_experts``. Every rank of it passes the same ``x`` (and ``resample_counts``);
            each adds the statistics of its own experts and a share of the layer-level ones (the layer Jacobian is
            summed over the group, and the pointwise alignment's expert Jacobians gathered), so the sum of the
            group's statistics is one process's. Needs ``config.layer_jacobian_method`` other than ``"func"``.
        local_experts: the experts this rank holds, with ``expert_group``.

    Returns:
        A :class:`ProbeStatistics`; sum several with ``+`` or :meth:`ProbeStatistics.reduce`, then :func:`finalize`.
    """
    cfg = _checked_arguments(view, x, config, expert_group, local_experts)
    num_experts = int(view.num_experts)
    x_ND = x.detach().reshape(-1, x.shape[-1]).to(cfg.dtype)
    counts_BN = probe_resample_counts(cfg, x_ND, resample_counts)

    module = view.module

    def accumulate() -> tuple[ProbeContext, TokenCounts, list[Accumulator], BufferLayout, Tensor]:
        partial_ctx = probe_context(view, x_ND, cfg, expert_group, local_experts)
        tokens, quantities = _accumulators(partial_ctx)
        layout = BufferLayout(cfg.bootstrap)
        for acc in (tokens, *quantities):
            acc.allocate(layout)
        layout.finish()
        # What the accumulators need of every chunk and where the buffer keeps their replicas are known only now.
        # The accumulators keep no reference to the context, so every one of them sees this whole one, through the
        # chunks and close(); its failure record is the partial context's, which the PCA widths' collective used.
        ctx = dataclasses.replace(
            partial_ctx,
            all_token_jacobians=any(q.needs_all_token_jacobians for q in quantities),
            replicas=layout.replicas,
        )
        buffer = layout.zeros(ctx.dtype, ctx.device)
        # Under expert parallelism a rank that fails goes on (ctx.guarded) and enters every collective of the
        # group, which waits for it otherwise; it raises its first error at the end.
        # Above the threshold each step allocates and frees many large temporaries (cast weights, Krylov bases,
        # cores); handing the freed pages back keeps the resident set at what is live (common/memory.py).
        release = ctx.release
        for chunk in _chunks(ctx, x_ND, tokens, buffer, counts_BN):
            for acc in (tokens, *quantities):
                ctx.guarded(lambda acc=acc, chunk=chunk: acc.add(chunk, buffer), lambda: None)
                release()
        for acc in quantities:
            ctx.guarded(lambda acc=acc: acc.close(ctx, buffer), lambda: None)
            release()
        ctx.failure.raise_if_any()
        return ctx, tokens, quantities, layout, buffer

    # A view that casts what it reads holds one expert's cast weights at a time; lending would hold a cast copy of
    # the whole layer (twice a float32 layer's size in float64) for the whole probe.
    lend = cfg.cast_module and not (isinstance(view, CastsOnRead) and view.casts_weights_on_read())
    with _observation(module, cfg):
        ctx, tokens, quantities, layout, buffer = with_cast_copies(
            lent[0] if len(lent := lent_modules(view)) == 1 else lent,
            cfg.dtype if lend else None,
            accumulate,
        )
    name = str(view.name)
    rows = {slot: kept for acc in quantities for slot, kept in acc.take_rows().items()}
    return ProbeStatistics(
        name, num_experts, ctx.dim, cfg, tokens, tuple(quantities), tuple(layout.slots), buffer, layout.replicas, rows
    )


def _checked_arguments(
    view: MoEView, x: Tensor, config: ProbeConfig | None, expert_group: Any, local_experts: range | None
) -> ProbeConfig:
    """The config :func:`probe_statistics` runs with, once its arguments are checked (``ValueError`` naming the
    argument otherwise)."""
    check_view(view, "probe")
    cfg = ProbeConfig() if config is None else config
    if not isinstance(cfg, ProbeConfig):
        raise ValueError(f"probe: config must be a ProbeConfig or None, got {type(cfg).__name__}")
    num_experts = int(view.num_experts)
    if num_experts < 1:
        raise ValueError(f"probe: view.num_experts must be >= 1, got {num_experts!r}")
    if x.dim() < 2:
        raise ValueError(f"probe: x must have shape (N, D) or (..., D), got {tuple(x.shape)}")
    if (expert_group is None) != (local_experts is None):
        raise ValueError("probe: give expert_group and local_experts together (expert parallelism), or neither")
    if local_experts is not None and not (0 <= local_experts.start and local_experts.stop <= num_experts):
        # Checked here, where every rank of the group fails alike, not inside the probe, where one rank's error
        # would leave the others waiting in a collective.
        raise ValueError(
            f"probe: local_experts={local_experts} must lie within the view's {num_experts} experts "
            f"(allowed: a range inside range(0, {num_experts}))"
        )
    if expert_group is not None and cfg.layer_jacobian and cfg.layer_jacobian_method == "func":
        raise ValueError(
            "probe: ProbeConfig.layer_jacobian_method='func' runs the whole layer on one rank, which expert "
            "parallelism does not allow; use 'auto' or 'compose'"
        )
    return cfg


def finalize(stats: ProbeStatistics | list[ProbeStatistics]) -> GeometryReport:
    """Phase 3 of :func:`probe`: turn (summed) statistics into a :class:`GeometryReport`.

    Args:
        stats: the reduced statistics, or a list of per-shard statistics to sum first.

    Returns:
        The report; each quantity's accumulator writes its entries, in the order they were built.
    """
    if isinstance(stats, list):
        if not stats:
            raise ValueError("finalize: stats list is empty")
        total = stats[0]
        for s in stats[1:]:
            total = total + s
        stats = total
    buffer = stats.buffer
    report = stats.tokens.start_report(buffer, stats.name, stats.dim)
    done: dict[Any, Any] = dict(stats.rows)  # the gathered per-token rows, by row slot
    for acc in stats.quantities:
        done[acc] = acc.finalize(buffer, report, done)
    stats.tokens.close_report(report)
    if stats.replicas:
        cfg = stats.config
        report.bootstrap = {"replicates": cfg.bootstrap, "seed": cfg.bootstrap_seed, "values": bootstrap_values(stats)}
    return report


def probe(
    view: MoEView,
    x: Tensor,
    config: ProbeConfig | None = None,
    *,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
    gather_fn: Callable[[Tensor], Tensor] | None = None,
) -> GeometryReport:
    """Probe one MoE layer: Jacobian spectra, PCA, alignment and subspaces on captured inputs (docs/geometry.md §1–5).

    ``probe = finalize(probe_statistics(view, x, config).reduce(reduce_fn))``.

    Args:
        view: the layer, as an :class:`~moe_lightning.geometry.view.MoEView`.
        x: ``(N, D)`` (or ``(..., D)``) layer inputs captured on this rank.
        config: options; defaults to ``ProbeConfig()``.
        reduce_fn: for DDP, a function that sums a tensor across ranks and returns the sum (for instance
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``). It is called exactly once, with a 1-D
            buffer whose length does not depend on the data.
        gather_fn: for DDP, with ``reduce_fn``, a function that concatenates an ``(n, width)`` tensor across ranks
            in rank order (``n`` may differ between ranks), for the per-token rows of the PCA's token path
            (docs/geometry.md §3); required when the statistics keep such rows.

    Returns:
        A :class:`GeometryReport`.

    Example:
        >>> W = [torch.randn(4, 4, dtype=torch.float64) for _ in range(2)]
        >>> class View:
        ...     name, module, num_experts = "toy", None, 2
        ...     def gates(self, x): return torch.softmax(x[:, :2], -1)
        ...     def expert(self, e): return lambda x: torch.tanh(x @ W[e])
        ...     def expert_hidden(self, e): return None
        ...     def expert_jacobian(self, e, x): return None
        >>> report = probe(View(), torch.randn(16, 4, dtype=torch.float64))
        >>> sorted(report.scalars("geometry/toy"))[0]
        'geometry/toy/align_chance'
    """
    stats = probe_statistics(view, x, config)
    if reduce_fn is not None:
        stats = stats.reduce(reduce_fn, gather_fn)
    return finalize(stats)
