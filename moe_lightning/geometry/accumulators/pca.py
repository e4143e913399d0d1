"""Weighted PCA per expert at the input, hidden and output sites (docs/geometry.md §3), from the moments ``Σw z`` and
``Σw z zᵀ`` or, where those ``E`` matrices of ``D × D`` would not fit the memory budget, from the routed tokens
themselves; and their eigendecompositions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.tokens import TokenCounts
from moe_lightning.geometry.pca import (
    PCAResult,
    pca_from_moments,
    pca_from_tokens,
    pca_ranks,
    pca_ranks_from_tokens,
)
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout, RowSlot, Slot

__all__ = ["PCAMoments"]

_QUANTITIES = ("effective_rank", "participation_ratio", "n90", "n_eff", "undersampled")


class PCAMoments(Accumulator):
    """Each expert's weighted PCA of its site activations, with the gate values as weights.

    Which sites exist for which expert is decided from shapes only (the experts' outputs on no tokens),
    identically on every rank: a site wider than ``pca_max_dim`` or unknown (no ``expert_hidden``) is skipped.

    A site is on one of two paths, also decided from shapes and the config only (docs/geometry.md §3):

    - **moments**: first and second weighted moments per expert in the summed buffer, when the ``E`` matrices
      ``D × D`` (and their bootstrap replicas) fit ``memory_budget_bytes``;
    - **tokens**: otherwise, one row per routed (token, expert) pair, ``[expert, w, resample counts…, z]``,
      gathered across chunks and ranks (:class:`~moe_lightning.geometry.statistics.RowSlot`); memory scales with
      the routed tokens. At the end each expert is finalised on its own, from the ``n_e × n_e`` Gram matrix when
      ``n_e < D``, else from its ``D × D`` moments, one expert at a time
      (:func:`~moe_lightning.geometry.pca.pca_from_tokens`). Both paths give the same values up to round-off.

    Args:
        ctx: the probe's context.
        tokens: the token counts (``Σw``, ``Σw²`` and ``N_e`` of the moments).
        sites: the sites to accumulate.
        reported: the sites to write into the report (the subspaces may need ``"input"`` alone).
    """

    def __init__(self, ctx: ProbeContext, tokens: TokenCounts, sites: list[str], reported: tuple[str, ...]) -> None:
        self.tokens, self.reported = tokens, reported
        empty_x = torch.zeros(0, ctx.dim, dtype=ctx.dtype, device=ctx.device)
        self.widths: dict[str, list[int]] = {}
        here, num_experts = ctx.experts_here, ctx.num_experts

        def site_widths(site: str) -> list[int]:
            widths = []
            for e in range(num_experts):
                if e not in here:  # another rank's expert (expert parallelism): its holder knows the width
                    width = 0
                elif site == "input":
                    width = ctx.dim
                elif site == "output":
                    width = ctx.experts[e](empty_x).shape[-1]
                else:
                    width = ctx.hidden[e](empty_x).shape[-1] if ctx.hidden[e] is not None else 0
                widths.append(width if 0 < width <= ctx.config.pca_max_dim else 0)
            return widths

        for site in sites:
            if ctx.expert_group is None:
                self.widths[site] = site_widths(site)
                continue
            # each expert's width is nonzero on its holder only; NaN (a rank failed) is no width
            summed = ctx.sum_over_experts(
                lambda s=site: torch.tensor(site_widths(s), dtype=ctx.dtype, device=ctx.device), (num_experts,)
            )
            self.widths[site] = [int(w) if w == w else 0 for w in summed.tolist()]

        cfg = ctx.config
        copies = 1 + cfg.bootstrap  # the plain moments and one replica per resample
        itemsize = torch.finfo(ctx.dtype).bits // 8
        #: the sites on the token path, whose moments would exceed the memory budget; a tuple in site order, never
        #: a set: every rank must gather the row slots in the same order, and a set of strings iterates in an order
        #: that differs between processes.
        self.from_tokens = tuple(
            site
            for site, widths in self.widths.items()
            if copies * itemsize * sum(w * w for w in widths) > cfg.memory_budget_bytes
        )
        self.memory_budget_bytes = cfg.memory_budget_bytes
        self.min_vectors = min(cfg.subspace_rank, ctx.dim)  # the representational subspaces' rank
        self.dtype, self.device = ctx.dtype, ctx.device
        self._rows: dict[str, list[Tensor]] = {site: [] for site in self.from_tokens}

    def allocate(self, layout: BufferLayout) -> None:
        #: site -> per expert ``(Σw z, Σw z zᵀ)`` slots, None where the site is skipped or on the token path.
        self.moments: dict[str, list[tuple[Slot, Slot] | None]] = {
            site: [
                (
                    layout.allocate(f"pca/{site}/e{e}/sum_wz", w, resampled=True),
                    layout.allocate(f"pca/{site}/e{e}/sum_wzz", w, w, resampled=True),
                )
                if w and site not in self.from_tokens
                else None
                for e, w in enumerate(widths)
            ]
            for site, widths in self.widths.items()
        }
        self.replicates = layout.replicates
        #: site -> its token rows ``[expert, w, counts (B), z (padded to the site's widest expert)]``.
        self.row_slots: dict[str, RowSlot] = {
            site: layout.allocate_rows(f"pca/{site}/tokens", 2 + self.replicates + max(self.widths[site]))
            for site in self.from_tokens
            if any(self.widths[site])
        }

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        ctx = chunk.ctx
        for e in ctx.experts_here:
            x_e = chunk.inputs(e)
            if x_e.shape[0] == 0:
                continue
            w, c = chunk.weights(e), chunk.counts_of(e)
            for site, slots in self.moments.items():
                if not self.widths[site][e]:
                    continue
                z = x_e if site == "input" else ctx.experts[e](x_e) if site == "output" else ctx.hidden[e](x_e)
                z = z.to(ctx.dtype)
                if site in self.row_slots:
                    self._rows[site].append(self._token_rows(site, e, z, w, c))
                    continue
                zw = z * w.unsqueeze(-1)
                sum_wz, sum_wzz = slots[e]
                sum_wz.of(buffer).add_(zw.sum(0))
                sum_wzz.of(buffer).add_(zw.T @ z)
                replica = ctx.replicas.get(sum_wzz)
                if c is not None and replica is not None:
                    cw = c.to(z.dtype) * w
                    ctx.add_resampled(buffer, sum_wz, cw, z)
                    replica.of(buffer).add_(torch.einsum("bn,ni,nj->bij", cw, z, z))

    def _token_rows(self, site: str, e: int, z_nD: Tensor, w_n: Tensor, c_Bn: Tensor | None) -> Tensor:
        """Expert ``e``'s rows of ``site``: ``[e, w, counts (B), z, zeros up to the row width]``."""
        n = z_nD.shape[0]
        pad = self.row_slots[site].width - 2 - self.replicates - z_nD.shape[1]
        counts = torch.zeros(n, self.replicates, dtype=z_nD.dtype, device=z_nD.device) if c_Bn is None else c_Bn.T
        parts = [torch.full((n, 1), float(e), dtype=z_nD.dtype, device=z_nD.device), w_n.unsqueeze(-1), counts, z_nD]
        return torch.cat([*parts, z_nD.new_zeros(n, pad)], dim=1)

    def take_rows(self) -> dict[RowSlot, Tensor]:
        rows = {
            slot: torch.cat(self._rows[site]) if self._rows[site] else slot.empty(self.dtype, self.device)
            for site, slot in self.row_slots.items()
        }
        self._rows = {site: [] for site in self.from_tokens}
        return rows

    def _experts_rows(self, site: str, rows: Tensor) -> list[tuple[Tensor, Tensor, Tensor] | None]:
        """Per expert, ``(z, w, counts)`` of its gathered rows of ``site``; None where the site is skipped."""
        ids = rows[:, 0].round().long()
        order = torch.argsort(ids, stable=True)
        per_expert = torch.bincount(ids, minlength=len(self.widths[site])).tolist()
        out: list[tuple[Tensor, Tensor, Tensor] | None] = []
        for e, block in enumerate(rows[order].split(per_expert)):
            width = self.widths[site][e]
            start = 2 + self.replicates
            out.append(None if not width else (block[:, start : start + width], block[:, 1], block[:, 2:start]))
        return out

    def finalize(
        self, buffer: Tensor, report: GeometryReport, done: dict[Any, Any]
    ) -> dict[str, list[PCAResult | None]]:
        """Write the reported sites; return every site's per-expert results (None where skipped). ``done`` holds the
        gathered rows of the token path's sites under their row slots."""
        count, sum_w, sum_w2 = (s.of(buffer) for s in (self.tokens.count, self.tokens.sum_w, self.tokens.sum_w2))
        results: dict[str, list[PCAResult | None]] = {}
        for site, slots in self.moments.items():
            if site in self.row_slots:
                results[site] = [
                    None if part is None else pca_from_tokens(part[0], part[1], min_vectors=self.min_vectors)
                    for part in self._experts_rows(site, done[self.row_slots[site]])
                ]
            else:
                results[site] = [
                    None
                    if pair is None
                    else pca_from_moments(sum_w[e], sum_w2[e], pair[0].of(buffer), pair[1].of(buffer), count[e])
                    for e, pair in enumerate(slots)
                ]
            if site not in self.reported or all(res is None for res in results[site]):
                continue
            report.pca[site] = results[site]
            for q in _QUANTITIES:
                report.expert[f"pca_{site}_{q}"] = torch.tensor(
                    [math.nan if res is None else float(getattr(res, q)) for res in results[site]],
                    dtype=torch.float64,
                )
            v = report.variants
            v[f"pca_{site}_effective_rank"] = "roy_vetterli_2007_on_eigenvalues"
            v[f"pca_{site}_participation_ratio"] = "sum_sq_over_sum_of_sq"
            v[f"pca_{site}_n90"] = "components_for_90pct_variance"
            v[f"pca_{site}_covariance"] = "weighted_divide_by_sum_w"
        return results

    def batch_resamples(self, replica_of: Callable[[Slot], Tensor]) -> dict[str, Tensor]:
        """The reported sites' per-expert quantities on every resample, key -> ``(B, E)``: one batched eigenvalue
        decomposition per expert and site instead of one per resample (no eigenvectors: the resampled PCA
        quantities are ranks). On the token path ``replica_of(row_slot)`` is the gathered rows, which carry each
        token's resample counts."""
        sum_w, sum_w2 = replica_of(self.tokens.sum_w), replica_of(self.tokens.sum_w2)
        out: dict[str, Tensor] = {}
        for site, slots in self.moments.items():
            if site not in self.reported or not any(self.widths[site]):
                continue
            columns = {q: torch.full(sum_w.shape, math.nan, dtype=torch.float64) for q in _QUANTITIES}
            if site in self.row_slots:
                for e, part in enumerate(self._experts_rows(site, replica_of(self.row_slots[site]))):
                    if part is not None:
                        z, w, c = part
                        ranks = pca_ranks_from_tokens(z, c.T * w, self.memory_budget_bytes)
                        for q in _QUANTITIES:
                            columns[q][:, e] = ranks[q].to(torch.float64)
            for e, pair in enumerate(slots):
                if pair is not None:
                    ranks = pca_ranks(sum_w[:, e], sum_w2[:, e], replica_of(pair[0]), replica_of(pair[1]))
                    for q in _QUANTITIES:
                        columns[q][:, e] = ranks[q].to(torch.float64)
            out.update({f"pca_{site}_{q}": values for q, values in columns.items()})
        return out

    def finalize_resample(
        self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any], batched: Any, b: int
    ) -> None:
        for key, values in batched.items():
            report.expert[key] = values[b]
