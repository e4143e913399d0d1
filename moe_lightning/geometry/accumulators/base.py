"""The :class:`Accumulator` contract every probe quantity follows (allocate its slots, add a chunk, finalise into
the report), and :class:`SpectralMoments`, the weighted spectral sums the expert and layer spectra share
(docs/geometry.md §2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.spectra import SPECTRAL_STAT_NAMES, SPECTRAL_VARIANTS, spectral_stats
from moe_lightning.geometry.statistics import BufferLayout, RowSlot, Slot

__all__ = ["Accumulator", "NotComputed", "SkippedForOneExpert", "SpectralMoments", "safe_div", "take_queued"]


class Accumulator:
    """One quantity of the probe, in three steps on the one flat statistics buffer.

    1. :meth:`allocate` reserves the quantity's :class:`~moe_lightning.geometry.statistics.Slot` slices, from
       shapes only, so every rank allocates the same;
    2. :meth:`add` adds one :class:`Chunk` of tokens into them (sums only, so ranks and chunks add up);
    3. :meth:`finalize` turns the summed slots into entries of the :class:`GeometryReport`.

    :meth:`close` runs once after the last chunk, for a quantity that queues tokens across chunks.
    An accumulator keeps no reference to the view, so statistics can outlive the model; the one exception is the
    factored mean Jacobian (:class:`~moe_lightning.geometry.accumulators.mean_jacobian.FactoredMeanJacobian`),
    which reads the experts' weights again when finalised rather than hold a copy as large as the layer.
    """

    #: Whether :meth:`add` needs every expert's Jacobian on every token of a chunk (see ``ProbeContext``).
    needs_all_token_jacobians: bool = False
    #: Whether the bootstrap finalises this quantity on each resample (its slots, and those it reads from the
    #: quantities before it, have replicas).
    resampled: bool = True

    def allocate(self, layout: BufferLayout) -> None:
        """Reserve this quantity's slots in ``layout``."""

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        """Add ``chunk``'s contribution to this quantity's slots of ``buffer``."""

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        """Add whatever is still queued after the last chunk."""

    def take_rows(self) -> dict[RowSlot, Tensor]:
        """After :meth:`close`: the per-token rows this quantity kept, by the row slots it allocated (handed to the
        statistics, which gather them across ranks; ``finalize`` finds them in ``done`` under their slots)."""
        return {}

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> Any:
        """Write this quantity into ``report`` from the summed ``buffer``.

        Args:
            buffer: the statistics, summed over chunks and ranks.
            report: the report being built; earlier quantities have written theirs.
            done: what the accumulators finalised before this one returned, by accumulator, and the gathered
                per-token rows, by :class:`~moe_lightning.geometry.statistics.RowSlot`.

        Returns:
            What later quantities may use (for instance the PCA results), or None.
        """

    def batch_resamples(self, replica_of: Callable[[Slot], Tensor]) -> Any:
        """Before the resamples are finalised one by one: what this quantity computes for all ``B`` of them at once
        (``replica_of(slot)`` is the ``(B, *shape)`` replica of one of its slots), or None."""
        return None

    def finalize_resample(
        self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any], batched: Any, b: int
    ) -> Any:
        """:meth:`finalize` on bootstrap resample ``b``'s statistics ``buffer``; ``batched`` is what
        :meth:`batch_resamples` returned."""
        return self.finalize(buffer, report, done)


class SkippedForOneExpert(Accumulator):
    """A quantity between experts (alignment, subspaces) on a layer with one expert: only its variant says so.

    Args:
        key: the quantity's variant key.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        report.variants[self.key] = "skipped_single_expert"


class NotComputed(Accumulator):
    """Quantities the probe does not compute on this path: only their variants say so, and why.

    Args:
        keys: the quantities' variant keys.
        variant: the reason, as a variant (``unavailable_<why>``).
    """

    def __init__(self, keys: tuple[str, ...], variant: str) -> None:
        self.keys, self.variant = keys, variant

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        for key in self.keys:
            report.variants[key] = self.variant


def take_queued(queue: list[tuple[Tensor, Tensor, Tensor | None]]) -> tuple[Tensor, Tensor, Tensor | None]:
    """An expert's queued ``(tokens, weights, (B, n) bootstrap counts or None)`` entries as one such entry (the
    queue is emptied)."""
    xs, ws, cs = zip(*queue, strict=True)
    queue.clear()
    return torch.cat(xs), torch.cat(ws), None if cs[0] is None else torch.cat(cs, dim=1)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, NaN elsewhere (an expert without tokens has no mean)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


class SpectralMoments:
    """``Σw``, ``Σw·stat`` and ``Σw·stat²`` of the spectral statistics (docs/geometry.md §2), for their weighted
    mean and population std; each statistic counts only the tokens where it is finite.

    Statistics that are estimated per token (docs/geometry.md §1, "Estimated quantities") also sum ``Σw²·var``, the
    variance of each token's estimate weighted as in the mean: the tokens' estimates are independent (each draws its
    own probes), so ``(Σw²·var)^½ / Σw`` is the standard error of the weighted mean, ``{prefix}_{stat}_se``.

    An estimate may also carry a systematic error that does not average out over tokens (the quadrature error of
    the effective rank): its weighted mean ``Σw·err / Σw`` is ``{prefix}_{stat}_quadrature_error``.

    Args:
        layout: where the slots are allocated.
        prefix: slot-name and report-key prefix (``"jac"``, ``"layer_jac"``).
        lead: leading shape (``(E,)`` per expert, ``()`` for the layer).
        estimated: the statistics whose values are estimates with a variance (a ``_se`` key each).
        systematic: those of them that also carry a quadrature error.
    """

    def __init__(
        self,
        layout: BufferLayout,
        prefix: str,
        *lead: int,
        estimated: tuple[str, ...] = (),
        systematic: tuple[str, ...] = (),
    ) -> None:
        n_stats = len(SPECTRAL_STAT_NAMES)
        self.prefix = prefix
        self.sum_w: Slot = layout.allocate(f"{prefix}/sum_w", *lead, n_stats, resampled=True)
        self.sum_w_stat: Slot = layout.allocate(f"{prefix}/sum_w_stat", *lead, n_stats, resampled=True)
        self.sum_w_stat2: Slot = layout.allocate(f"{prefix}/sum_w_stat2", *lead, n_stats, resampled=True)
        unknown = [name for name in (*estimated, *systematic) if name not in SPECTRAL_STAT_NAMES]
        assert not unknown, f"not spectral statistics: {unknown}"
        self.estimated = estimated
        self.sum_w2_var: Slot | None = layout.allocate(f"{prefix}/sum_w2_var", *lead, n_stats) if estimated else None
        self.systematic = systematic
        self.sum_w_err: Slot | None = layout.allocate(f"{prefix}/sum_w_err", *lead, n_stats) if systematic else None

    def add(
        self,
        buffer: Tensor,
        singular_values_NM: Tensor,
        w_N: Tensor,
        *,
        fit_max: int | None,
        truncated: bool,
        index: int | None = None,
        ctx: ProbeContext | None = None,
        counts_BN: Tensor | None = None,
        known: dict[str, tuple[Tensor, ...]] | None = None,
    ) -> None:
        """Add the statistics of ``N`` spectra with weights ``w_N`` (at ``index`` of the leading shape, if any).

        Args:
            buffer: the statistics buffer.
            singular_values_NM: ``(N, M)`` descending singular values.
            w_N: ``(N,)`` token weights.
            fit_max: largest index of the decay-slope fit.
            truncated: the spectra are top-``M`` only, so the Frobenius norm is unknown (NaN).
            index: position in the leading shape (an expert); None when there is none.
            ctx: the probe's context, which adds the spectra to the bootstrap replicas; None: no bootstrap.
            counts_BN: ``(B, N)`` resample counts of the ``N`` tokens; None without a bootstrap.
            known: statistics of truncated spectra known otherwise, which need every singular value (the
                Frobenius norm, stable and effective ranks): name -> ``(N,)`` values (exact from a factored expert,
                or estimated), ``(N,)`` variances of the estimates (None where exact; required for the
                ``estimated`` statistics) and optionally ``(N,)`` quadrature errors.
        """
        stats = spectral_stats(singular_values_NM, fit_max=fit_max)
        if truncated:  # the Frobenius norm needs every singular value
            stats["frobenius"] = torch.full_like(stats["frobenius"], math.nan)
        variances, errors = {}, {}
        for name, (values_N, var_N, *err_N) in (known or {}).items():
            stats[name] = values_N.to(stats[name].dtype)
            if var_N is not None:
                variances[name] = var_N.to(stats[name].dtype)
            if err_N:
                errors[name] = err_N[0].to(stats[name].dtype)
        values_NS = torch.stack([stats[k] for k in SPECTRAL_STAT_NAMES], dim=-1)
        ok = torch.isfinite(values_NS)
        v = torch.where(ok, values_NS, torch.zeros_like(values_NS))
        wo = w_N.unsqueeze(-1) * ok.to(values_NS.dtype)
        if self.sum_w2_var is not None:
            var_NS = torch.zeros_like(values_NS)
            for name in self.estimated:
                i = SPECTRAL_STAT_NAMES.index(name)
                var_NS[:, i] = variances[name]
            target = self.sum_w2_var.of(buffer)
            if index is not None:
                target = target[index]
            target += (wo * w_N.unsqueeze(-1) * torch.where(ok, var_NS, torch.zeros_like(var_NS))).sum(0)
        if self.sum_w_err is not None:
            err_NS = torch.zeros_like(values_NS)
            for name in self.systematic:
                err_NS[:, SPECTRAL_STAT_NAMES.index(name)] = errors[name]
            target = self.sum_w_err.of(buffer)
            if index is not None:
                target = target[index]
            target += (wo * torch.where(ok, err_NS, torch.zeros_like(err_NS))).sum(0)
        for slot, value in ((self.sum_w, wo), (self.sum_w_stat, wo * v), (self.sum_w_stat2, wo * v * v)):
            target = slot.of(buffer)
            if index is not None:
                target = target[index]
            target += value.sum(0)
            if ctx is not None:
                ctx.add_resampled(buffer, slot, counts_BN, value, index=index)

    def write(
        self, buffer: Tensor, target: dict, variants: dict[str, str], *, fit_max: int | None, top: int | None
    ) -> None:
        """Write ``{prefix}_{stat}`` (weighted mean) and ``{prefix}_{stat}_std`` into ``target`` and the definition
        variants into ``variants``.

        Args:
            buffer: the summed statistics.
            target: where the values go (``report.expert`` for experts; a dict of 0-d tensors for the layer).
            variants: the report's variants.
            fit_max: the decay-slope fit's largest index (named in its variant).
            top: ``M`` when the spectra were truncated to the top ``M`` values (matrix-free), else None.
        """
        w = self.sum_w.of(buffer)
        mean = safe_div(self.sum_w_stat.of(buffer), w)
        std = torch.sqrt((safe_div(self.sum_w_stat2.of(buffer), w) - mean**2).clamp_min(0))
        se = None if self.sum_w2_var is None else safe_div(self.sum_w2_var.of(buffer).clamp_min(0).sqrt(), w)
        for i, name in enumerate(SPECTRAL_STAT_NAMES):
            key = f"{self.prefix}_{name}"
            target[key] = mean[..., i]
            target[f"{key}_std"] = std[..., i]
            if se is not None and name in self.estimated:
                target[f"{key}_se"] = se[..., i]
            if name in self.systematic:
                target[f"{key}_quadrature_error"] = safe_div(self.sum_w_err.of(buffer), w)[..., i]
            variant = SPECTRAL_VARIANTS[name]
            if top is not None and name != "sigma_max":
                variant = "unavailable_matrix_free" if name == "frobenius" else f"{variant}_on_top{top}"
            if name == "decay_slope":
                variant += f"_fit_max={fit_max or 'all'}"
            variants[key] = variant
