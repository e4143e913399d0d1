"""``probe(view, x)``: the docs/geometry.md §1–5 quantities of one MoE layer on a set of captured layer inputs.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width, ``S`` spectral statistics
(:data:`~moe_lightning.geometry.spectra.SPECTRAL_STAT_NAMES`), ``M`` singular values kept per Jacobian
(``D`` on the exact path, ``r`` on the matrix-free path), ``R`` subspace rank.

The probe is two-phase so that DDP is exact (additive sums, as for the PCA moments of docs/geometry.md §3):

1. :func:`probe_statistics` turns this rank's tokens into *additive* sufficient statistics: ``Σw``, ``Σw²``,
   token counts, ``Σw·stat``, ``Σw·stat²``, ``Σw·σ`` (mean spectrum), ``Σw·J`` (mean Jacobian ``J̄_e``),
   ``Σw x`` and ``Σw x xᵀ`` per PCA site, and ``Σ|cos|`` with counts for pointwise alignment.
2. :meth:`ProbeStatistics.reduce` sums them across ranks with one ``reduce_fn`` call on one flat buffer whose
   length depends only on the view's shapes and the config, never on the data (an expert without tokens on a rank
   contributes zeros), so every rank makes the same collective call.
3. :func:`finalize` turns the summed statistics into a :class:`GeometryReport`.

Probing disjoint shards and summing their statistics gives the one-process result on the union, up to float
summation order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.geometry.alignment import (
    alignment_chance,
    jacobian_alignment,
    offdiag_summary,
    pointwise_cosine_sums,
)
from moe_lightning.geometry.jacobians import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    compose_layer_jacobian,
    expert_jacobian,
    jacobians,
    layer_jacobian,
)
from moe_lightning.geometry.matrix_free import (
    JacobianOperator,
    _krylov_bytes_per_token,
    compose_layer_operator,
    topr_singular_values,
)
from moe_lightning.geometry.pca import PCAResult, pca_from_moments
from moe_lightning.geometry.spectra import (
    SPECTRAL_STAT_NAMES,
    SPECTRAL_VARIANTS,
    batched_svdvals,
    spectral_stats,
)
from moe_lightning.geometry.subspaces import grassmann_distance, subspace_overlap_chance

__all__ = ["GeometryReport", "ProbeConfig", "ProbeStatistics", "finalize", "probe", "probe_statistics"]

PCA_SITES = ("input", "hidden", "output")
_JACOBIAN_METHODS = ("auto", "closed_form", "func")
_LAYER_METHODS = ("auto", "compose", "func")
_DTYPES = (torch.float64, torch.float32)


@dataclass
class ProbeConfig:
    """Options of :func:`probe`; validated on construction.

    Attributes:
        jacobian: per-expert Jacobian spectra (docs/geometry.md §1–2).
        layer_jacobian: spectra of the layer Jacobian through the router (§1).
        pca: weighted PCA at the sites in ``pca_sites`` (§3).
        alignment: mean-Jacobian and pointwise alignment (§4); skipped when E = 1.
        subspaces: functional and representational Grassmann overlaps (§5); skipped when E = 1.
        pca_sites: any of ``"input"``, ``"hidden"``, ``"output"``.
        dtype: computation dtype (``torch.float64`` or ``torch.float32``).
        memory_budget_bytes: peak-memory budget of one token chunk.
        subspace_rank: ``r`` of the subspaces (capped at D).
        decay_fit_max: largest index in the decay-slope fit; None uses every singular value.
        jacobian_method: ``"auto"`` (the view's closed form if offered, else torch.func), ``"closed_form"``
            (require it: ``expert_jacobian``, or ``expert_jacobian_operator`` on the matrix-free path) or ``"func"``.
        layer_jacobian_method: ``"auto"``/``"compose"`` (product rule, reusing expert Jacobians) or ``"func"``.
        matrix_free_threshold: above this D the spectra are the matrix-free top-``matrix_free_rank`` values
            and the quantities that need whole Jacobians (Frobenius norm, alignment, functional subspaces) are NaN.
        matrix_free_rank: number of singular values on the matrix-free path.
        matrix_free_oversample: extra columns ``p`` of the randomized block Krylov method
            (:func:`~moe_lightning.geometry.topr_singular_values`): ``K = r + p`` sets the convergence lag and the
            unit of ``matrix_free_max_iter``.
        matrix_free_max_iter: the basis holds at most ``K · matrix_free_max_iter`` columns per token.
        matrix_free_tol: relative tolerance on the values (tokens that miss it are counted in ``jac_unconverged``).
        pca_max_dim: a PCA site wider than this is skipped (its ``Σw x xᵀ`` would be too large).
        seed: seed of the matrix-free start blocks (a local generator; the global RNG is untouched).
        cast_module: temporarily cast the view module's floating parameters and buffers to ``dtype`` (restored,
            bit for bit, afterwards) so that the view's functions accept ``dtype`` inputs.
        eval_mode: run the module in eval mode (each submodule's mode is restored afterwards).
    """

    jacobian: bool = True
    layer_jacobian: bool = True
    pca: bool = True
    alignment: bool = True
    subspaces: bool = True
    pca_sites: tuple[str, ...] = PCA_SITES
    dtype: torch.dtype = torch.float64
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    subspace_rank: int = 8
    decay_fit_max: int | None = None
    jacobian_method: str = "auto"
    layer_jacobian_method: str = "auto"
    matrix_free_threshold: int = 1024
    matrix_free_rank: int = 16
    matrix_free_oversample: int = 8
    matrix_free_max_iter: int = 30
    matrix_free_tol: float = 1e-6
    pca_max_dim: int = 4096
    seed: int = 0
    cast_module: bool = True
    eval_mode: bool = True

    def __post_init__(self) -> None:
        for name in ("jacobian", "layer_jacobian", "pca", "alignment", "subspaces", "cast_module", "eval_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ProbeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self.pca_sites = tuple(self.pca_sites)
        bad = [s for s in self.pca_sites if s not in PCA_SITES]
        if bad or len(set(self.pca_sites)) != len(self.pca_sites):
            raise ValueError(f"ProbeConfig.pca_sites must be distinct values of {PCA_SITES}, got {self.pca_sites!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ProbeConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("memory_budget_bytes", "subspace_rank", "matrix_free_threshold", "matrix_free_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProbeConfig.{name} must be a positive int, got {value!r}")
        for name in ("matrix_free_max_iter", "pca_max_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProbeConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.matrix_free_oversample, int) or self.matrix_free_oversample < 0:
            raise ValueError(
                f"ProbeConfig.matrix_free_oversample must be an int >= 0, got {self.matrix_free_oversample!r}"
            )
        if not (isinstance(self.matrix_free_tol, (int, float)) and self.matrix_free_tol >= 0):
            raise ValueError(f"ProbeConfig.matrix_free_tol must be a float >= 0, got {self.matrix_free_tol!r}")
        if self.decay_fit_max is not None and (not isinstance(self.decay_fit_max, int) or self.decay_fit_max < 2):
            raise ValueError(f"ProbeConfig.decay_fit_max must be None or an int >= 2, got {self.decay_fit_max!r}")
        if self.jacobian_method not in _JACOBIAN_METHODS:
            raise ValueError(
                f"ProbeConfig.jacobian_method must be one of {_JACOBIAN_METHODS}, got {self.jacobian_method!r}"
            )
        if self.layer_jacobian_method not in _LAYER_METHODS:
            raise ValueError(
                f"ProbeConfig.layer_jacobian_method must be one of {_LAYER_METHODS}, got {self.layer_jacobian_method!r}"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"ProbeConfig.seed must be an int, got {self.seed!r}")


@dataclass
class ProbeStatistics:
    """Additive sufficient statistics of one probe (see the module docstring).

    Attributes:
        name: the view's name.
        num_experts: E.
        dim: D.
        config: the :class:`ProbeConfig` used.
        layout: data-independent facts finalisation needs (hidden widths, sites, matrix-free flag, sources).
        tensors: named statistics; keys and shapes depend only on the view's shapes and ``config``.
    """

    name: str
    num_experts: int
    dim: int
    config: ProbeConfig
    layout: dict[str, Any]
    tensors: dict[str, Tensor]

    def _check_compatible(self, other: ProbeStatistics) -> None:
        mine = {k: tuple(v.shape) for k, v in self.tensors.items()}
        theirs = {k: tuple(v.shape) for k, v in other.tensors.items()}
        if mine != theirs:
            raise ValueError(f"ProbeStatistics of {self.name!r}: cannot combine statistics with different layouts")

    def __add__(self, other: ProbeStatistics) -> ProbeStatistics:
        self._check_compatible(other)
        return ProbeStatistics(
            self.name,
            self.num_experts,
            self.dim,
            self.config,
            self.layout,
            {k: v + other.tensors[k] for k, v in self.tensors.items()},
        )

    def flatten(self) -> Tensor:
        """All statistics in one 1-D buffer, keys in sorted order."""
        return torch.cat([self.tensors[k].reshape(-1) for k in sorted(self.tensors)])

    def unflatten(self, flat: Tensor) -> ProbeStatistics:
        """Inverse of :meth:`flatten` (same keys and shapes, new values)."""
        out, offset = {}, 0
        for k in sorted(self.tensors):
            t = self.tensors[k]
            out[k] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
            offset += t.numel()
        return ProbeStatistics(self.name, self.num_experts, self.dim, self.config, self.layout, out)

    def reduce(self, reduce_fn: Callable[[Tensor], Tensor]) -> ProbeStatistics:
        """Sum across ranks with exactly one ``reduce_fn`` call on a flat buffer of data-independent length."""
        return self.unflatten(reduce_fn(self.flatten()))


@dataclass
class GeometryReport:
    """Everything :func:`probe` measured on one MoE layer.

    Attributes:
        name: the view's name (module path).
        num_experts: E.
        dim: D.
        total_tokens: finite tokens probed (summed over ranks).
        nonfinite_tokens: tokens dropped because their input or gate values were NaN/Inf.
        tokens: ``(E,)`` routed tokens ``N_e`` per expert.
        weight_sum: ``(E,)`` ``Σ w_e``.
        n_eff: ``(E,)`` effective sample size ``(Σw)²/Σw²``.
        empty: ``(E,)`` bool, experts without routed tokens (their values are NaN).
        expert: per-expert quantities, name -> ``(E,)`` (see :meth:`scalars` for the names).
        layer: layer-level scalars (layer Jacobian, alignment and subspace summaries, chance levels).
        matrices: ``(E, E)`` matrices: ``align_mean_jacobian``, ``align_pointwise``, ``subspace_{fun,rep}_
            {overlap,geodesic,projection}``.
        spectra: ``jac_mean_spectrum`` ``(E, M)`` (NaN rows for empty experts), ``layer_jac_mean_spectrum``
            ``(M,)``.
        pca: site -> per-expert :class:`PCAResult` (eigenvalues, n_eff, undersampled flag, ...).
        variants: quantity -> the definition variant it used.
    """

    name: str
    num_experts: int
    dim: int
    total_tokens: int
    nonfinite_tokens: int
    tokens: Tensor
    weight_sum: Tensor
    n_eff: Tensor
    empty: Tensor
    expert: dict[str, Tensor] = field(default_factory=dict)
    layer: dict[str, float] = field(default_factory=dict)
    matrices: dict[str, Tensor] = field(default_factory=dict)
    spectra: dict[str, Tensor] = field(default_factory=dict)
    pca: dict[str, list[PCAResult]] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)

    @property
    def pca_eigenvalues(self) -> dict[str, list[Tensor]]:
        """Site -> per-expert PCA eigenvalue vectors (descending)."""
        return {site: [res.eigenvalues for res in results] for site, results in self.pca.items()}

    def scalars(self, prefix: str = "geometry", max_experts: int | None = None) -> dict[str, float]:
        """Flatten to metric keys (docs/design.md "Metric keys").

        Per-expert values become ``f"{prefix}/{quantity}/e{i}"`` and their mean over experts with a finite value
        ``f"{prefix}/{quantity}/mean"``; layer-level values become ``f"{prefix}/{quantity}"``.

        Args:
            prefix: key prefix, e.g. ``f"geometry/{view.name}"``.
            max_experts: keep per-expert keys only for experts ``0..max_experts-1`` (aggregates always kept).
        """
        if max_experts is not None and (not isinstance(max_experts, int) or max_experts < 0):
            raise ValueError(f"GeometryReport.scalars: max_experts must be None or an int >= 0, got {max_experts!r}")
        out: dict[str, float] = {}
        shown = self.num_experts if max_experts is None else min(max_experts, self.num_experts)
        for quantity, values in self.expert.items():
            vals = values.detach().to(torch.float64).cpu()
            for i in range(shown):
                out[f"{prefix}/{quantity}/e{i}"] = float(vals[i])
            finite = vals[torch.isfinite(vals)]
            out[f"{prefix}/{quantity}/mean"] = float(finite.mean()) if finite.numel() else math.nan
        for quantity, value in self.layer.items():
            out[f"{prefix}/{quantity}"] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything except the PCA eigenvectors (``D×D`` per expert and site); NaN stays
        NaN (Python's ``json`` writes and reads it). Inverse: :meth:`from_dict`."""

        def plain(t: Tensor) -> Any:
            return t.detach().to(torch.float64).cpu().tolist() if t.is_floating_point() else t.cpu().tolist()

        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "dim": self.dim,
            "total_tokens": self.total_tokens,
            "nonfinite_tokens": self.nonfinite_tokens,
            "tokens": plain(self.tokens),
            "weight_sum": plain(self.weight_sum),
            "n_eff": plain(self.n_eff),
            "empty": plain(self.empty),
            "expert": {k: plain(v) for k, v in self.expert.items()},
            "layer": {k: float(v) for k, v in self.layer.items()},
            "matrices": {k: plain(v) for k, v in self.matrices.items()},
            "spectra": {k: plain(v) for k, v in self.spectra.items()},
            "pca": {
                site: [
                    {
                        "eigenvalues": plain(r.eigenvalues),
                        "total_weight": float(r.total_weight),
                        "num_tokens": int(r.num_tokens),
                        "n_eff": float(r.n_eff),
                        "effective_rank": float(r.effective_rank),
                        "participation_ratio": float(r.participation_ratio),
                        "n90": float(r.n90),
                        "undersampled": bool(r.undersampled),
                    }
                    for r in results
                ]
                for site, results in self.pca.items()
            },
            "variants": dict(self.variants),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeometryReport:
        """Rebuild a report written by :meth:`to_dict` (float64 tensors; PCA eigenvectors and means empty)."""

        def tensor(values: Any, dtype: torch.dtype = torch.float64) -> Tensor:
            return torch.tensor(values, dtype=dtype)

        empty = torch.empty(0, dtype=torch.float64)
        return cls(
            name=data["name"],
            num_experts=int(data["num_experts"]),
            dim=int(data["dim"]),
            total_tokens=int(data["total_tokens"]),
            nonfinite_tokens=int(data["nonfinite_tokens"]),
            tokens=tensor(data["tokens"], torch.long),
            weight_sum=tensor(data["weight_sum"]),
            n_eff=tensor(data["n_eff"]),
            empty=tensor(data["empty"], torch.bool),
            expert={k: tensor(v) for k, v in data.get("expert", {}).items()},
            layer={k: float(v) for k, v in data.get("layer", {}).items()},
            matrices={k: tensor(v) for k, v in data.get("matrices", {}).items()},
            spectra={k: tensor(v) for k, v in data.get("spectra", {}).items()},
            pca={
                site: [
                    PCAResult(
                        eigenvalues=tensor(r["eigenvalues"]),
                        eigenvectors=empty,
                        mean=empty,
                        total_weight=r["total_weight"],
                        num_tokens=r["num_tokens"],
                        n_eff=r["n_eff"],
                        effective_rank=r["effective_rank"],
                        participation_ratio=r["participation_ratio"],
                        n90=r["n90"],
                        undersampled=r["undersampled"],
                    )
                    for r in results
                ]
                for site, results in data.get("pca", {}).items()
            },
            variants=dict(data.get("variants", {})),
        )


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: statistics
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _observation(module: nn.Module | None, cfg: ProbeConfig) -> Iterator[None]:
    """No grad, eval mode and dtype cast for the probe; restores modes and the original tensors."""
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        if isinstance(module, nn.Module):
            if cfg.eval_mode:
                module.eval()
            if cfg.cast_module:
                for t in itertools.chain(module.parameters(), module.buffers()):
                    if t.is_floating_point() and t.dtype != cfg.dtype:
                        saved.append((t, t.data))
                        t.data = t.data.to(cfg.dtype)
        with torch.no_grad():
            yield
    finally:
        for t, data in saved:
            t.data = data
        for m, mode in modes:
            m.training = mode


def _weighted_stat_sums(values_NS: Tensor, w_N: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Σw``, ``Σw·v`` and ``Σw·v²`` per statistic, over the tokens where the statistic is finite."""
    ok = torch.isfinite(values_NS)
    v = torch.where(ok, values_NS, torch.zeros_like(values_NS))
    wo = w_N.unsqueeze(-1) * ok.to(values_NS.dtype)
    return wo.sum(0), (wo * v).sum(0), (wo * v * v).sum(0)


def _stats_matrix(singular_values_NM: Tensor, fit_max: int | None, truncated: bool) -> Tensor:
    stats = spectral_stats(singular_values_NM, fit_max=fit_max)
    if truncated:  # the Frobenius norm needs every singular value
        stats["frobenius"] = torch.full_like(stats["frobenius"], math.nan)
    return torch.stack([stats[k] for k in SPECTRAL_STAT_NAMES], dim=-1)  # (N, S)


def probe_statistics(view: Any, x: Tensor, config: ProbeConfig | None = None) -> ProbeStatistics:
    """Phase 1 of :func:`probe`: this rank's additive statistics for one MoE layer.

    Args:
        view: an ``MoEView`` (``name``, ``module``, ``num_experts``, ``gates``, ``expert``, ``expert_hidden``,
            ``expert_jacobian``).
        x: ``(N, D)`` (or ``(..., D)``) captured layer inputs; rows with NaN/Inf are dropped and counted.
        config: options; defaults to ``ProbeConfig()``.

    Returns:
        A :class:`ProbeStatistics`; sum several with ``+`` or :meth:`ProbeStatistics.reduce`, then :func:`finalize`.
    """
    cfg = ProbeConfig() if config is None else config
    if not isinstance(cfg, ProbeConfig):
        raise ValueError(f"probe: config must be a ProbeConfig or None, got {type(cfg).__name__}")
    num_experts = int(view.num_experts)
    if num_experts < 1:
        raise ValueError(f"probe: view.num_experts must be >= 1, got {num_experts!r}")
    if x.dim() < 2:
        raise ValueError(f"probe: x must have shape (N, D) or (..., D), got {tuple(x.shape)}")
    dtype = cfg.dtype
    x_ND = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    d = x_ND.shape[1]
    S = len(SPECTRAL_STAT_NAMES)
    multi = num_experts > 1
    matrix_free = d > cfg.matrix_free_threshold
    m = min(cfg.matrix_free_rank, d) if matrix_free else d
    want_mean_jac = cfg.jacobian and not matrix_free and multi and (cfg.alignment or cfg.subspaces)
    want_pointwise = cfg.jacobian and not matrix_free and multi and cfg.alignment
    r = min(cfg.subspace_rank, d)

    module = getattr(view, "module", None)
    with _observation(module, cfg):
        experts = [view.expert(e) for e in range(num_experts)]
        hidden_fns = [view.expert_hidden(e) if hasattr(view, "expert_hidden") else None for e in range(num_experts)]
        # Which PCA sites exist for which expert is decided from shapes only, identically on every rank.
        sites: dict[str, list[int]] = {}
        if cfg.pca or (cfg.subspaces and multi):
            empty_x = x_ND[:0]
            wanted = list(cfg.pca_sites) if cfg.pca else []
            if cfg.subspaces and multi and "input" not in wanted:
                wanted.append("input")
            for site in wanted:
                widths = []
                for e in range(num_experts):
                    if site == "input":
                        width = d
                    elif site == "output":
                        width = experts[e](empty_x).shape[-1]
                    else:
                        width = hidden_fns[e](empty_x).shape[-1] if hidden_fns[e] is not None else 0
                    widths.append(width if 0 < width <= cfg.pca_max_dim else 0)
                sites[site] = widths

        t: dict[str, Tensor] = {}

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=x_ND.device)

        t["tokens_total"], t["tokens_nonfinite"] = zeros(1), zeros(1)
        t["count"], t["sum_w"], t["sum_w2"] = zeros(num_experts), zeros(num_experts), zeros(num_experts)
        if cfg.jacobian:
            t["jac_w"], t["jac_ws"], t["jac_ws2"] = zeros(num_experts, S), zeros(num_experts, S), zeros(num_experts, S)
            t["jac_spectrum_w"] = zeros(num_experts, m)
            if matrix_free:
                t["jac_unconverged"] = zeros(num_experts)
        if want_mean_jac:
            t["jac_mean_w"] = zeros(num_experts, d, d)
        if want_pointwise:
            t["palign_sum"], t["palign_count"] = zeros(num_experts, num_experts), zeros(num_experts, num_experts)
        if cfg.layer_jacobian:
            t["layer_n"], t["layer_s"], t["layer_s2"] = zeros(S), zeros(S), zeros(S)
            t["layer_spectrum"] = zeros(m)
            if matrix_free:
                t["layer_jac_unconverged"] = zeros(1)
        for site, widths in sites.items():
            for e, width in enumerate(widths):
                if width:
                    t[f"pca/{site}/e{e}/swx"] = zeros(width)
                    t[f"pca/{site}/e{e}/swxx"] = zeros(width, width)

        jac_sources: set[str] = set()
        finite_N = torch.isfinite(x_ND).all(-1)
        t["tokens_nonfinite"] += (~finite_N).sum()
        x_valid = x_ND[finite_N]
        itemsize = x_ND.element_size()
        chunk = max(1, cfg.memory_budget_bytes // _bytes_per_token(cfg, d, m, num_experts, itemsize, matrix_free))

        def add_expert_spectra(e: int, sv: Tensor, w: Tensor) -> None:
            vals = _stats_matrix(sv, cfg.decay_fit_max, truncated=matrix_free)
            sw, sws, sws2 = _weighted_stat_sums(vals, w)
            t["jac_w"][e] += sw
            t["jac_ws"][e] += sws
            t["jac_ws2"][e] += sws2
            t["jac_spectrum_w"][e] += (w.unsqueeze(-1) * sv).sum(0)

        # Matrix-free expert spectra run on an expert's routed tokens gathered over chunks (tokens, gates), ``chunk``
        # at a time: an expert sees only its share of a chunk (about top_k / E of it), and its tokens share every
        # GEMM of the Krylov products, so full batches are what make them fast. ``lone_op[e]``: the operator the
        # layer's spectra built on exactly the tokens queued for ``e`` (one entry), reused by its run.
        pending: dict[int, list[tuple[Tensor, Tensor]]] = {e: [] for e in range(num_experts)}
        lone_op: dict[int, JacobianOperator] = {}

        def flush(e: int, final: bool) -> None:
            """Run expert ``e``'s queued tokens in calls of ``chunk``; a shorter remainder waits unless ``final``."""
            built = lone_op.pop(e, None)  # one entry of at most ``chunk`` tokens: it runs as one batch
            x_q, w_q = (torch.cat(parts) for parts in zip(*pending[e], strict=True))
            pending[e].clear()
            n_run = x_q.shape[0] if final else x_q.shape[0] // chunk * chunk
            if n_run < x_q.shape[0]:
                pending[e].append((x_q[n_run:], w_q[n_run:]))
            for start in range(0, n_run, chunk):
                x_b, w_b = x_q[start : start + chunk], w_q[start : start + chunk]
                op = built if built is not None else _expert_operator(view, e, x_b, cfg)
                res = topr_singular_values(op or experts[e], x_b, m, **_topr_kwargs(cfg))
                jac_sources.add("matrix_free_topr")
                add_expert_spectra(e, res.values, w_b)
                t["jac_unconverged"][e] += (~res.converged).sum()

        for start in range(0, x_valid.shape[0], chunk):
            x_c = x_valid[start : start + chunk]
            g_cE = view.gates(x_c).to(dtype)
            ok = torch.isfinite(g_cE).all(-1)
            if not bool(ok.all()):
                t["tokens_nonfinite"] += (~ok).sum()
                x_c, g_cE = x_c[ok], g_cE[ok]
            n_c = x_c.shape[0]
            if n_c == 0:
                continue
            t["tokens_total"] += n_c
            per_expert_J: list[tuple[Tensor, Tensor]] = []
            expert_ops: dict[int, tuple[Tensor, JacobianOperator | None]] = {}  # reused by the layer's operator
            all_J: list[Tensor] = []
            for e in range(num_experts):
                rows = g_cE[:, e] > 0
                w = g_cE[rows, e]
                x_e = x_c[rows]
                t["count"][e] += rows.sum()
                t["sum_w"][e] += w.sum()
                t["sum_w2"][e] += (w * w).sum()
                for site, widths in sites.items():
                    if not widths[e] or x_e.shape[0] == 0:
                        continue
                    z = x_e if site == "input" else experts[e](x_e) if site == "output" else hidden_fns[e](x_e)
                    z = z.to(dtype)
                    zw = z * w.unsqueeze(-1)
                    t[f"pca/{site}/e{e}/swx"] += zw.sum(0)
                    t[f"pca/{site}/e{e}/swxx"] += zw.T @ z
                if not cfg.jacobian:
                    continue
                if matrix_free:
                    if x_e.shape[0]:
                        op = None
                        if cfg.layer_jacobian and cfg.layer_jacobian_method != "func":
                            op = _expert_operator(view, e, x_e, cfg)
                            expert_ops[e] = (rows, op)
                        if pending[e] or op is None:
                            lone_op.pop(e, None)  # several entries run as one batch: no operator to reuse
                        else:
                            lone_op[e] = op
                        pending[e].append((x_e, w))
                        if sum(q[0].shape[0] for q in pending[e]) >= chunk:
                            flush(e, final=False)
                    continue
                x_need = x_c if want_pointwise else x_e
                J = _expert_jacobian(view, e, x_need, cfg, jac_sources).to(dtype)
                J_e = J[rows] if want_pointwise else J
                if want_pointwise:
                    all_J.append(J)
                per_expert_J.append((rows, J_e))
                sv = batched_svdvals(J_e) if J_e.shape[0] else zeros(0, m)
                if want_mean_jac:
                    t["jac_mean_w"][e] += torch.einsum("n,nij->ij", w, J_e)
                add_expert_spectra(e, sv, w)
            if want_pointwise:
                s, c = pointwise_cosine_sums(torch.stack(all_J, dim=1))
                t["palign_sum"] += s
                t["palign_count"] += c
            if cfg.layer_jacobian:
                sv_layer, converged = _layer_singular_values(
                    view, experts, x_c, g_cE, per_expert_J, expert_ops, cfg, matrix_free, m
                )
                if matrix_free:
                    t["layer_jac_unconverged"] += (~converged).sum()
                vals = _stats_matrix(sv_layer, cfg.decay_fit_max, truncated=matrix_free)
                sw, sws, sws2 = _weighted_stat_sums(vals, torch.ones(n_c, dtype=dtype, device=x_c.device))
                t["layer_n"] += sw
                t["layer_s"] += sws
                t["layer_s2"] += sws2
                t["layer_spectrum"] += sv_layer.sum(0)

        for e in range(num_experts):
            if pending[e]:  # what is left: fewer than ``chunk`` tokens an expert
                flush(e, final=True)

    if matrix_free:
        source = f"matrix_free_topr(r={m})"
    elif cfg.jacobian_method == "func":
        source = "torch_func"
    else:
        # Decided from the view's capabilities, so it is the same on every rank that saw tokens.
        source = "closed_form" if _has_closed_form(view, x_ND) else "torch_func"
    layout = {"sites": sites, "matrix_free": matrix_free, "jacobian_source": source, "subspace_rank": r}
    return ProbeStatistics(str(getattr(view, "name", "")), num_experts, d, cfg, layout, t)


def _bytes_per_token(cfg: ProbeConfig, d: int, m: int, num_experts: int, itemsize: int, matrix_free: bool) -> int:
    """Peak bytes per token of one chunk of :func:`probe_statistics`; ``chunk = memory_budget_bytes // this``."""
    if matrix_free:
        # No D x D matrix: the Krylov workspace, plus the experts' outputs and gate Jacobians for the layer
        # operator and K block columns through ~4D-wide expert activations. Tokens of a call share every GEMM
        # against the weights, and from 8 tokens on the Krylov blocks shrink to 4 columns, so per token a larger
        # call is cheaper (docs/benchmarks/geometry.md): chunks are as large as the budget allows.
        k = min(m + cfg.matrix_free_oversample, d)
        return _krylov_bytes_per_token(d, k, cfg.matrix_free_max_iter, itemsize) + itemsize * d * (
            3 * num_experts + 8 * k
        )
    return itemsize * (3 * (num_experts + 1) * d * d + 8 * d)


def _has_closed_form(view: Any, x_ND: Tensor) -> bool:
    if not hasattr(view, "expert_jacobian"):
        return False
    probe_x = torch.zeros(1, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
    return view.expert_jacobian(0, probe_x) is not None


def _expert_operator(view: Any, e: int, x_ND: Tensor, cfg: ProbeConfig) -> JacobianOperator | None:
    """The view's closed-form Jacobian products for the matrix-free path (``expert_jacobian_operator``), if any;
    with ``jacobian_method="closed_form"`` they are required, as the closed-form Jacobian is on the exact path."""
    if cfg.jacobian_method == "func":
        return None
    op = view.expert_jacobian_operator(e, x_ND) if hasattr(view, "expert_jacobian_operator") else None
    if op is None and cfg.jacobian_method == "closed_form":
        raise ValueError(
            f"ProbeConfig.jacobian_method='closed_form' but view {getattr(view, 'name', '')!r} offers no "
            f"expert_jacobian_operator for expert {e}, which the matrix-free path (D > matrix_free_threshold) "
            f"needs; use 'auto' or 'func'"
        )
    return op


def _expert_jacobian(view: Any, e: int, x_ND: Tensor, cfg: ProbeConfig, sources: set[str]) -> Tensor:
    if cfg.jacobian_method == "closed_form" and x_ND.shape[0]:
        J = view.expert_jacobian(e, x_ND) if hasattr(view, "expert_jacobian") else None
        if J is None:
            raise ValueError(
                f"ProbeConfig.jacobian_method='closed_form' but view {getattr(view, 'name', '')!r} offers no "
                f"expert_jacobian for expert {e}; use 'auto' or 'func'"
            )
        return J
    return expert_jacobian(
        view, e, x_ND, prefer_closed_form=cfg.jacobian_method != "func", memory_budget_bytes=cfg.memory_budget_bytes
    )


def _topr_kwargs(cfg: ProbeConfig) -> dict[str, Any]:
    """The ``topr_singular_values`` settings of ``cfg``, the same for the experts' spectra and the layer's."""
    return dict(
        oversample=cfg.matrix_free_oversample, max_iter=cfg.matrix_free_max_iter, tol=cfg.matrix_free_tol, seed=cfg.seed
    )


def _layer_operator(
    view: Any,
    experts: list,
    x_c: Tensor,
    g_cE: Tensor,
    expert_ops: dict[int, tuple[Tensor, JacobianOperator | None]],
    cfg: ProbeConfig,
) -> JacobianOperator | None:
    """The layer Jacobian as composed products (:func:`compose_layer_operator`) when every expert with routed
    tokens offers ``expert_jacobian_operator``; None (torch.func through the layer function) otherwise. The
    operators the experts' own spectra used (``expert_ops``: rows and operator per expert) are reused where they
    hold the same tokens (a build computes the expert's activations and, for a probe dtype other than the
    model's, casts its weights)."""
    parts = []
    for e in range(len(experts)):
        rows = g_cE[:, e] != 0
        if not bool(rows.any()):
            parts.append((rows, None))
            continue
        cached = expert_ops.get(e)
        op = (
            cached[1]
            if cached is not None and torch.equal(cached[0], rows)
            else _expert_operator(view, e, x_c[rows], cfg)
        )
        if op is None:
            return None
        parts.append((rows, op))
    dg = jacobians(view.gates, x_c, memory_budget_bytes=cfg.memory_budget_bytes, mode="jacrev").to(g_cE.dtype)
    outputs = [experts[e](x_c).to(g_cE.dtype) for e in range(len(experts))]
    return compose_layer_operator(g_cE, dg, outputs, parts)


def _layer_singular_values(
    view: Any,
    experts: list,
    x_c: Tensor,
    g_cE: Tensor,
    per_expert_J: list[tuple[Tensor, Tensor]],
    expert_ops: dict[int, tuple[Tensor, JacobianOperator | None]],
    cfg: ProbeConfig,
    matrix_free: bool,
    m: int,
) -> tuple[Tensor, Tensor | None]:
    """The layer Jacobian's singular values on the chunk, and (matrix-free) which tokens' top-r converged."""
    if matrix_free:

        def layer_fn(x: Tensor) -> Tensor:
            g = view.gates(x)
            return sum(g[:, e : e + 1] * experts[e](x) for e in range(len(experts)))

        op = None if cfg.layer_jacobian_method == "func" else _layer_operator(view, experts, x_c, g_cE, expert_ops, cfg)
        res = topr_singular_values(op or layer_fn, x_c, m, **_topr_kwargs(cfg))
        return res.values, res.converged
    if cfg.layer_jacobian_method == "func":
        J = layer_jacobian(view, x_c, method="func", memory_budget_bytes=cfg.memory_budget_bytes)
    elif per_expert_J:
        dg = jacobians(view.gates, x_c, memory_budget_bytes=cfg.memory_budget_bytes, mode="jacrev")
        outputs = [experts[e](x_c) for e in range(len(experts))]
        J = compose_layer_jacobian(g_cE, dg.to(g_cE.dtype), outputs, per_expert_J)
    else:
        J = layer_jacobian(view, x_c, method="compose", memory_budget_bytes=cfg.memory_budget_bytes)
    return batched_svdvals(J), None


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: finalize
# ---------------------------------------------------------------------------------------------------------------


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def finalize(stats: ProbeStatistics | list[ProbeStatistics]) -> GeometryReport:
    """Phase 3 of :func:`probe`: turn (summed) statistics into a :class:`GeometryReport`.

    Args:
        stats: the reduced statistics, or a list of per-shard statistics to sum first.
    """
    if isinstance(stats, list):
        if not stats:
            raise ValueError("finalize: stats list is empty")
        total = stats[0]
        for s in stats[1:]:
            total = total + s
        stats = total
    t, cfg, lay = stats.tensors, stats.config, stats.layout
    num_experts, d = stats.num_experts, stats.dim
    multi = num_experts > 1
    count, sum_w, sum_w2 = t["count"], t["sum_w"], t["sum_w2"]
    empty = count == 0
    report = GeometryReport(
        name=stats.name,
        num_experts=num_experts,
        dim=d,
        total_tokens=int(round(float(t["tokens_total"]))),
        nonfinite_tokens=int(round(float(t["tokens_nonfinite"]))),
        tokens=count.clone(),
        weight_sum=sum_w.clone(),
        n_eff=torch.where(sum_w2 > 0, sum_w**2 / torch.where(sum_w2 > 0, sum_w2, torch.ones_like(sum_w2)), 0 * sum_w),
        empty=empty,
    )
    report.expert["tokens"] = count.clone()
    report.expert["n_eff"] = report.n_eff.clone()
    v = report.variants
    v["weighting"] = "gate_value_w_e=g_e(x)_over_g_e>0"
    v["expert_mean"] = "unweighted_mean_over_experts_with_finite_value"
    v["std"] = "weighted_population_std"
    source = lay["jacobian_source"]
    truncated = lay["matrix_free"]

    def add_spectral(prefix: str, w: Tensor, ws: Tensor, ws2: Tensor, target: dict) -> None:
        mean = _safe_div(ws, w)
        std = torch.sqrt((_safe_div(ws2, w) - mean**2).clamp_min(0))
        for i, name in enumerate(SPECTRAL_STAT_NAMES):
            target[f"{prefix}_{name}"] = mean[..., i]
            target[f"{prefix}_{name}_std"] = std[..., i]
            variant = SPECTRAL_VARIANTS[name]
            if truncated and name != "sigma_max":
                variant = (
                    "unavailable_matrix_free" if name == "frobenius" else f"{variant}_on_top{cfg.matrix_free_rank}"
                )
            if name == "decay_slope":
                variant += f"_fit_max={cfg.decay_fit_max or 'all'}"
            v[f"{prefix}_{name}"] = variant

    if cfg.jacobian:
        add_spectral("jac", t["jac_w"], t["jac_ws"], t["jac_ws2"], report.expert)
        report.spectra["jac_mean_spectrum"] = _safe_div(t["jac_spectrum_w"], sum_w.unsqueeze(-1))
        v["jac_source"] = source
        if truncated:
            report.expert["jac_unconverged"] = t["jac_unconverged"].clone()
    if cfg.layer_jacobian:
        layer_vals: dict[str, Tensor] = {}
        add_spectral("layer_jac", t["layer_n"], t["layer_s"], t["layer_s2"], layer_vals)
        report.layer.update({k: float(val) for k, val in layer_vals.items()})
        n_tok = t["tokens_total"]
        report.spectra["layer_jac_mean_spectrum"] = _safe_div(t["layer_spectrum"], n_tok)
        v["layer_jac"] = "through_router_uniform_token_weights"
        if truncated:
            report.layer["layer_jac_unconverged"] = float(t["layer_jac_unconverged"])

    # PCA sites (docs/geometry.md §3).
    pca_results: dict[str, list[PCAResult]] = {}
    for site, widths in lay["sites"].items():
        results = []
        for e, width in enumerate(widths):
            if width:
                results.append(
                    pca_from_moments(
                        sum_w[e], sum_w2[e], t[f"pca/{site}/e{e}/swx"], t[f"pca/{site}/e{e}/swxx"], count[e]
                    )
                )
            else:
                results.append(None)
        pca_results[site] = results
        if cfg.pca and site in cfg.pca_sites and any(res is not None for res in results):
            report.pca[site] = results
            for q in ("effective_rank", "participation_ratio", "n90", "n_eff", "undersampled"):
                report.expert[f"pca_{site}_{q}"] = torch.tensor(
                    [math.nan if res is None else float(getattr(res, q)) for res in results], dtype=torch.float64
                )
            v[f"pca_{site}_effective_rank"] = "roy_vetterli_2007_on_eigenvalues"
            v[f"pca_{site}_participation_ratio"] = "sum_sq_over_sum_of_sq"
            v[f"pca_{site}_n90"] = "components_for_90pct_variance"
            v[f"pca_{site}_covariance"] = "weighted_divide_by_sum_w"

    # Alignment (docs/geometry.md §4).
    if multi and cfg.alignment and "jac_mean_w" in t:
        chance = alignment_chance(d, d)
        A = jacobian_alignment(t["jac_mean_w"])
        P = _safe_div(t["palign_sum"], t["palign_count"])
        report.matrices["align_mean_jacobian"] = A
        report.matrices["align_pointwise"] = P
        for key, M in (("align", A), ("palign", P)):
            mean_off, max_off = offdiag_summary(M)
            report.layer[f"{key}_mean_offdiag"] = mean_off
            report.layer[f"{key}_max_offdiag"] = max_off
            report.layer[f"{key}_ratio"] = mean_off / chance
        report.layer["align_chance"] = chance
        v["align"] = "mean_jacobian_abs_frobenius_cosine"
        v["palign"] = "pointwise_abs_frobenius_cosine_all_probe_tokens"
        v["align_chance"] = "exact_gaussian_E_abs_cos_n=d*d"
    elif not multi:
        v["align"] = "skipped_single_expert"

    # Subspaces (docs/geometry.md §5).
    if multi and cfg.subspaces:
        r = lay["subspace_rank"]
        bases: dict[str, list[Tensor | None]] = {}
        if "jac_mean_w" in t:
            fun, fun_gap = [], []
            for e in range(num_experts):
                Jbar = t["jac_mean_w"][e]
                if bool(empty[e]) or not bool((Jbar != 0).any()):
                    fun.append(None)
                    fun_gap.append(math.nan)
                else:
                    _, S, Vh = torch.linalg.svd(Jbar / sum_w[e])
                    fun.append(Vh[:r].T)  # top-r right singular vectors
                    fun_gap.append(rank_gap(S, r))
            bases["fun"] = fun
            report.expert["subspace_fun_gap"] = torch.tensor(fun_gap, dtype=torch.float64)
            v["subspace_fun"] = f"top{r}_right_singular_vectors_of_mean_jacobian"
        rep, rep_gap = [], []
        for res in pca_results.get("input", [None] * num_experts):
            ok = res is not None and res.total_weight > 0
            rep.append(res.eigenvectors[:, :r] if ok else None)
            rep_gap.append(rank_gap(res.eigenvalues, r) if ok else math.nan)
        bases["rep"] = rep
        report.expert["subspace_rep_gap"] = torch.tensor(rep_gap, dtype=torch.float64)
        v["subspace_rep"] = f"top{r}_eigenvectors_of_input_covariance"
        v["subspace_gap"] = "relative_gap_at_rank_r_(v_r-v_r+1)/v_r"
        for kind, basis in bases.items():
            mats = {q: torch.full((num_experts, num_experts), math.nan, dtype=torch.float64) for q in _GRASS}
            for i in range(num_experts):
                for j in range(num_experts):
                    if basis[i] is None or basis[j] is None:
                        continue
                    dist = grassmann_distance(basis[i], basis[j], orthonormal=True)
                    for q in _GRASS:
                        mats[q][i, j] = getattr(dist, q)
            for q, M in mats.items():
                report.matrices[f"subspace_{kind}_{q}"] = M
                mean_off, max_off = offdiag_summary(M)
                report.layer[f"subspace_{kind}_{q}"] = mean_off
                if q == "overlap":
                    report.layer[f"subspace_{kind}_overlap_max"] = max_off
        report.layer["subspace_overlap_chance"] = subspace_overlap_chance(r, d)
        report.layer["subspace_rank"] = float(r)
        v["subspace_overlap"] = "mean_cos_sq_principal_angles"
        v["subspace_overlap_chance"] = "r_over_d"
    elif not multi:
        v["subspaces"] = "skipped_single_expert"

    report.layer["tokens_total"] = float(report.total_tokens)
    report.layer["nonfinite_tokens"] = float(report.nonfinite_tokens)
    report.layer["empty_experts"] = float(empty.sum())
    return report


_GRASS = ("overlap", "geodesic", "projection")


def rank_gap(values: Tensor, r: int) -> float:
    """Relative gap ``(v_r − v_{r+1}) / v_r`` at rank ``r`` of a descending spectrum: how well the top-``r``
    subspace is determined (a project addition to the papers' quantities, docs/geometry.md §5).

    By Davis–Kahan (eigenvectors of a covariance) and Wedin (singular vectors of a mean Jacobian), a perturbation
    ``E`` of the matrix moves its top-``r`` subspace by at most about ``‖E‖ / (v_r − v_{r+1})``, so a gap near 0
    means the subspace, and every overlap computed from it, can swing with sampling noise or round-off. 1 when
    ``r`` is the whole space or ``v_{r+1} = 0 < v_r``; 0 when ``v_r = 0`` (fewer than ``r`` directions carry any
    variance); NaN for a non-finite spectrum.
    """
    v = values.detach().to(torch.float64)
    if v.numel() <= r:
        return 1.0
    vr, vnext = float(v[r - 1]), float(v[r])
    if not (math.isfinite(vr) and math.isfinite(vnext)):
        return math.nan
    return (vr - vnext) / vr if vr > 0 else 0.0


def probe(
    view: Any,
    x: Tensor,
    config: ProbeConfig | None = None,
    *,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> GeometryReport:
    """Probe one MoE layer: Jacobian spectra, PCA, alignment and subspaces on captured inputs (docs/geometry.md §1–5).

    ``probe = finalize(probe_statistics(view, x, config).reduce(reduce_fn))``.

    Args:
        view: an ``MoEView``.
        x: ``(N, D)`` (or ``(..., D)``) layer inputs captured on this rank.
        config: options; defaults to ``ProbeConfig()``.
        reduce_fn: for DDP, a function that sums a tensor across ranks and returns the sum (for instance
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``). It is called exactly once, with a 1-D
            buffer whose length does not depend on the data.

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
        stats = stats.reduce(reduce_fn)
    return finalize(stats)
