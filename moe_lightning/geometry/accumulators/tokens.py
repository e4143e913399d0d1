"""Token counts and gate weights per expert (``N_e``, ``Σw``, ``Σw²``; docs/geometry.md §2–3): the accumulator every
quantity's weighting rests on, which also starts and closes the report."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator
from moe_lightning.geometry.accumulators.context import Chunk
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["TokenCounts"]


class TokenCounts(Accumulator):
    """Tokens probed and dropped, and per expert the routed tokens ``N_e``, ``Σ w_e`` and ``Σ w_e²``.

    Args:
        num_experts: E.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def allocate(self, layout: BufferLayout) -> None:
        self.total = layout.allocate("tokens_total", 1)
        self.nonfinite = layout.allocate("tokens_nonfinite", 1)
        self.count = layout.allocate("count", self.num_experts, resampled=True)
        self.sum_w = layout.allocate("sum_w", self.num_experts, resampled=True)
        self.sum_w2 = layout.allocate("sum_w2", self.num_experts, resampled=True)

    def add_nonfinite(self, buffer: Tensor, dropped: Tensor) -> None:
        """Count the tokens dropped because their input or gate values were NaN/Inf (``dropped``: a bool mask)."""
        self.nonfinite.of(buffer).add_(dropped.sum())

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        self.total.of(buffer).add_(len(range(chunk.num_tokens)[chunk.ctx.token_share(chunk.num_tokens)]))
        count, sum_w, sum_w2 = self.count.of(buffer), self.sum_w.of(buffer), self.sum_w2.of(buffer)
        for e in range(self.num_experts):
            w = chunk.weights(e)
            count[e] += chunk.rows[e].sum()
            sum_w[e] += w.sum()
            sum_w2[e] += (w * w).sum()
            c = chunk.counts_of(e)
            if c is not None:
                for slot, values in ((self.count, torch.ones_like(w)), (self.sum_w, w), (self.sum_w2, w * w)):
                    chunk.ctx.add_resampled(buffer, slot, c, values, index=e)

    def start_report(self, buffer: Tensor, name: str, dim: int) -> GeometryReport:
        """A report holding the token counts and effective sample sizes, for the quantities to fill."""
        count, sum_w, sum_w2 = self.count.of(buffer), self.sum_w.of(buffer), self.sum_w2.of(buffer)
        safe_sum_w2 = torch.where(sum_w2 > 0, sum_w2, torch.ones_like(sum_w2))
        report = GeometryReport(
            name=name,
            num_experts=self.num_experts,
            dim=dim,
            total_tokens=int(round(float(self.total.of(buffer)))),
            nonfinite_tokens=int(round(float(self.nonfinite.of(buffer)))),
            tokens=count.clone(),
            weight_sum=sum_w.clone(),
            n_eff=torch.where(sum_w2 > 0, sum_w**2 / safe_sum_w2, 0 * sum_w),
            empty=count == 0,
        )
        report.expert["tokens"] = count.clone()
        report.expert["n_eff"] = report.n_eff.clone()
        report.variants["weighting"] = "gate_value_w_e=g_e(x)_over_g_e>0"
        report.variants["expert_mean"] = "unweighted_mean_over_experts_with_finite_value"
        report.variants["std"] = "weighted_population_std"
        return report

    def close_report(self, report: GeometryReport) -> None:
        """The layer-level token totals, last in the report."""
        report.layer["tokens_total"] = float(report.total_tokens)
        report.layer["nonfinite_tokens"] = float(report.nonfinite_tokens)
        report.layer["empty_experts"] = float(report.empty.sum())
