"""Linear CKA between the experts' outputs on every probe token (docs/geometry.md §4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator
from moe_lightning.geometry.accumulators.context import Chunk
from moe_lightning.geometry.alignment import offdiag_summary
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.similarity import cka_chance, linear_cka_from_sums, linear_cka_sums
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["ExpertCKA"]


class ExpertCKA(Accumulator):
    """Linear CKA between every pair of experts' outputs ``f_e(x)`` on all the probe tokens, routed or not (a
    functional similarity on shared inputs, as the pointwise alignment), from additive sums.

    Args:
        num_experts: E (at least 2).
        dim: D.
        too_large: the ``(E, E, D, D)`` cross products would exceed the config's bound: nothing is computed and
            the variant says so.
    """

    # The (E, E, D, D) cross products would need as many replicas as resamples.
    resampled = False

    def __init__(self, num_experts: int, dim: int, too_large: bool = False) -> None:
        self.num_experts, self.dim, self.too_large = num_experts, dim, too_large

    def allocate(self, layout: BufferLayout) -> None:
        if self.too_large:
            return
        e, d = self.num_experts, self.dim
        self.count = layout.allocate("cka/count", 1)
        self.sum_f = layout.allocate("cka/sum_f", e, d)
        self.cross = layout.allocate("cka/cross", e, e, d, d)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        if self.too_large:
            return
        # Under expert parallelism each rank evaluates its experts at every token; the cross products need all of
        # them, gathered, and each rank adds its share of the tokens.
        ctx, here = chunk.ctx, chunk.ctx.experts_here
        f_NED = ctx.gather_over_experts(
            lambda: torch.stack([chunk.all_token_output(e) for e in here], 1),
            (chunk.num_tokens, len(here), ctx.dim),
        )[ctx.token_share(chunk.num_tokens)]
        sum_ED, cross_EEDD = linear_cka_sums(f_NED)
        self.count.of(buffer).add_(f_NED.shape[0])
        self.sum_f.of(buffer).add_(sum_ED)
        self.cross.of(buffer).add_(cross_EEDD)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        if self.too_large:
            report.variants["cka"] = "skipped_too_large_E^2*D^2>pca_max_dim^2"
            return
        n = float(self.count.of(buffer)[0])
        cka = linear_cka_from_sums(n, self.sum_f.of(buffer), self.cross.of(buffer))
        report.matrices["cka"] = cka
        report.layer["cka_mean"], report.layer["cka_max"] = offdiag_summary(cka)
        report.layer["cka_chance"] = cka_chance(int(n), self.dim)
        report.variants["cka"] = "linear_cka_expert_outputs_all_probe_tokens"
        report.variants["cka_chance"] = "gaussian_ratio_of_expectations_D/(N+D)"
