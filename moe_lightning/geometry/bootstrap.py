"""The bootstrap over probe tokens (docs/geometry.md, "Bootstrap over probe tokens"): multinomial resample counts
of a probe set, and each resample's statistics, recomputed exactly from the probe's bootstrap replicas.

Every quantity of the probe is a smooth function of sums over tokens, so a resample that draws token ``n``
``c_n`` times has the sums ``Σ_n c_n · (token n's contribution)``. The accumulators add these into the replicas of
their slots (:class:`~moe_lightning.geometry.statistics.BufferLayout`) next to the plain sums, and
:func:`bootstrap_values` finalises each replicate as :func:`~moe_lightning.geometry.probe.finalize` does the plain
statistics: the value on the resampled token set, as if its tokens had been probed with their repeats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.geometry.probe_config import PCA_SITES, ProbeConfig
from moe_lightning.geometry.spectra import SPECTRAL_STAT_NAMES
from moe_lightning.geometry.statistics import ProbeStatistics, RowSlot, Slot

__all__ = ["BOOTSTRAP_QUANTITIES", "bootstrap_values", "probe_resample_counts", "resample_counts"]

#: The quantities recomputed on each resample, as metric keys less the ``geometry/<layer>/`` prefix: the experts'
#: spectral statistics and PCA ranks (their mean over experts), the layer Jacobian's spectral statistics and the
#: mean-Jacobian alignment. Keys the probe did not compute (a quantity switched off) are left out.
BOOTSTRAP_QUANTITIES: tuple[str, ...] = (
    *(f"jac_{s}/mean" for s in SPECTRAL_STAT_NAMES),
    *(f"pca_{site}_{q}/mean" for site in PCA_SITES for q in ("effective_rank", "participation_ratio", "n90")),
    *(f"layer_jac_{s}" for s in SPECTRAL_STAT_NAMES),
    "align_mean_offdiag",
    "align_max_offdiag",
    "align_ratio",
)


def resample_counts(num_tokens: int, replicates: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """``(replicates, num_tokens)`` counts of ``replicates`` multinomial resamples of ``num_tokens`` tokens (each
    draws ``num_tokens`` tokens uniformly with replacement), from a local generator seeded by ``seed``.

    The counts depend only on ``(num_tokens, replicates, seed)``: two probes of the same number of tokens with the
    same seed get the same resamples (a paired bootstrap), and DDP ranks slice one global draw.
    """
    for name, value in (("num_tokens", num_tokens), ("replicates", replicates)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"resample_counts: {name} must be an int >= 0, got {value!r}")
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(num_tokens, (replicates, num_tokens), generator=gen) if num_tokens else None
    counts = torch.zeros(replicates, num_tokens, dtype=torch.float64)
    if draws is not None:
        counts.scatter_add_(1, draws, torch.ones_like(counts))
    return counts.to(device)


def bootstrap_values(stats: ProbeStatistics) -> dict[str, list[float]]:
    """Each of :data:`BOOTSTRAP_QUANTITIES` on every resample of the (reduced) statistics: quantity -> ``B`` floats,
    NaN where a resample leaves it undefined (an expert no resampled token reaches, for instance).

    The quantities that rest on no replica (pointwise alignment, subspaces) are not finalised.
    """
    out: dict[str, list[float]] = {}
    quantities = [acc for acc in stats.quantities if acc.resampled]

    def replica_of(slot: Slot | RowSlot) -> Tensor:
        # per-token rows carry their tokens' resample counts: they are their own replica
        return stats.rows[slot] if isinstance(slot, RowSlot) else stats.replicas[slot].of(stats.buffer)

    batched = {acc: acc.batch_resamples(replica_of) for acc in quantities}
    for b in range(stats.config.bootstrap):
        buffer = stats.replicate(b)
        report = stats.tokens.start_report(buffer, stats.name, stats.dim)
        done: dict = dict(stats.rows)
        for acc in quantities:
            done[acc] = acc.finalize_resample(buffer, report, done, batched[acc], b)
        scalars = report.scalars("", max_experts=0)
        if b == 0:  # the keys depend on the config and the shapes only, so they are those of every resample
            out = {key: [] for key in BOOTSTRAP_QUANTITIES if f"/{key}" in scalars}
        for key, values in out.items():
            values.append(float(scalars[f"/{key}"]))
    return out


def probe_resample_counts(cfg: ProbeConfig, x_ND: Tensor, given: Tensor | None) -> Tensor | None:
    """The ``(B, N)`` bootstrap counts of ``x_ND``'s tokens that the probe uses, in its dtype: ``given`` (checked),
    drawn over ``x_ND`` when None, or None without a bootstrap."""
    if not cfg.bootstrap:
        if given is not None:
            raise ValueError("probe: resample_counts given but ProbeConfig.bootstrap is 0; set bootstrap = B > 0")
        return None
    if given is None:
        return resample_counts(x_ND.shape[0], cfg.bootstrap, cfg.bootstrap_seed, x_ND.device).to(cfg.dtype)
    if tuple(given.shape) != (cfg.bootstrap, x_ND.shape[0]):
        raise ValueError(
            f"probe: resample_counts must have shape (ProbeConfig.bootstrap, tokens) = "
            f"({cfg.bootstrap}, {x_ND.shape[0]}), got {tuple(given.shape)}"
        )
    return given.to(device=x_ND.device, dtype=cfg.dtype)
