"""``GeometryReport``: everything :func:`~moe_lightning.geometry.probe` measured on one MoE layer (the quantities of
docs/geometry.md §1–5), with its metric keys and a JSON round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.pca import PCAResult

__all__ = ["GeometryReport"]


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
        matrices: ``(E, E)`` matrices: ``align_mean_jacobian``, ``align_pointwise``, ``cka``, ``subspace_{fun,rep}_
            {overlap,geodesic,projection}``.
        spectra: ``jac_mean_spectrum`` ``(E, M)`` (NaN rows for empty experts), ``layer_jac_mean_spectrum``
            ``(M,)``.
        pca: site -> per-expert :class:`PCAResult` (eigenvalues, n_eff, undersampled flag, ...).
        variants: quantity -> the definition variant it used.
        bootstrap: with ``ProbeConfig.bootstrap = B > 0``, ``{"replicates": B, "seed": S, "values": {quantity:
            [B floats]}}``, the bootstrapped quantities on each resample of the probe tokens
            (:mod:`~moe_lightning.geometry.bootstrap`); None without a bootstrap.
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
    bootstrap: dict[str, Any] | None = None

    @property
    def pca_eigenvalues(self) -> dict[str, list[Tensor]]:
        """Site -> per-expert PCA eigenvalue vectors (descending)."""
        return {site: [res.eigenvalues for res in results] for site, results in self.pca.items()}

    def scalars(self, prefix: str = "geometry", max_experts: int | None = None) -> dict[str, float]:
        """Flatten to metric keys (docs/design.md "Metric keys").

        Per-expert values become ``f"{prefix}/{quantity}/e{i}"`` and their mean over experts with a finite value
        ``f"{prefix}/{quantity}/mean"``; layer-level values become ``f"{prefix}/{quantity}"``. The ``/mean`` of a
        standard error (``…_se``) is that of the mean over experts, ``(Σ_e se_e²)^½ / E``: the experts' estimates
        draw independent probes.

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
            if not finite.numel():
                out[f"{prefix}/{quantity}/mean"] = math.nan
            elif quantity.endswith("_se"):
                out[f"{prefix}/{quantity}/mean"] = float(finite.square().sum().sqrt() / finite.numel())
            else:
                out[f"{prefix}/{quantity}/mean"] = float(finite.mean())
        for quantity, value in self.layer.items():
            out[f"{prefix}/{quantity}"] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything except the PCA eigenvectors (``D×D`` per expert and site); NaN stays
        NaN (Python's ``json`` writes and reads it); ``"bootstrap"`` only when there is one. Inverse:
        :meth:`from_dict`."""

        def plain(t: Tensor) -> Any:
            return t.detach().to(torch.float64).cpu().tolist() if t.is_floating_point() else t.cpu().tolist()

        out = {
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
        if self.bootstrap is not None:
            b = self.bootstrap
            values = {k: [float(x) for x in v] for k, v in b["values"].items()}
            out["bootstrap"] = {"replicates": int(b["replicates"]), "seed": int(b["seed"]), "values": values}
        return out

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
            bootstrap=data.get("bootstrap"),
        )
