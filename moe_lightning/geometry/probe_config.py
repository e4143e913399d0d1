"""``ProbeConfig``: the options of :func:`~moe_lightning.geometry.probe` (which quantities of docs/geometry.md §1–5,
in which dtype, on which path), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lightning.common import DTYPES, check_choice, check_positive_int
from moe_lightning.common.choices import PCA_SITES
from moe_lightning.geometry.jacobians import DEFAULT_MEMORY_BUDGET_BYTES

__all__ = ["JACOBIAN_METHODS", "LAYER_JACOBIAN_METHODS", "PCA_SITES", "PROBE_DTYPES", "ProbeConfig"]

#: Values of :attr:`ProbeConfig.jacobian_method`.
JACOBIAN_METHODS = ("auto", "closed_form", "func")
#: Values of :attr:`ProbeConfig.layer_jacobian_method`.
LAYER_JACOBIAN_METHODS = ("auto", "compose", "func")
#: Dtypes the probe computes in (the spectra and moments need at least single precision).
PROBE_DTYPES = (DTYPES["float64"], DTYPES["float32"])
_FLAGS = (
    "jacobian",
    "layer_jacobian",
    "pca",
    "alignment",
    "pointwise_alignment",
    "cka",
    "subspaces",
    "cast_module",
    "eval_mode",
)
_POSITIVE_INTS = (
    "memory_budget_bytes",
    "subspace_rank",
    "matrix_free_threshold",
    "matrix_free_rank",
    "matrix_free_max_iter",
    "pca_max_dim",
    "matrix_free_slq_steps",
)
#: Fields that set a sample size of an estimate with a standard error: at least 2 samples make a sample variance.
_SAMPLE_SIZES = ("matrix_free_trace_probes", "matrix_free_slq_starts")


@dataclass
class ProbeConfig:
    """Options of :func:`probe`; validated on construction.

    Attributes:
        jacobian: per-expert Jacobian spectra (docs/geometry.md §1–2).
        layer_jacobian: spectra of the layer Jacobian through the router (§1).
        pca: weighted PCA at the sites in ``pca_sites`` (§3).
        alignment: mean-Jacobian and pointwise alignment (§4); skipped when E = 1.
        pointwise_alignment: with ``alignment``, the pointwise alignment too. Above ``matrix_free_threshold`` it
            forms one ``F × F`` Gram of the weights per pair of experts, ``O(E² · D · F²)`` in all: at real sizes
            the probe's largest cost by far (docs/benchmarks/real-scale.md); False leaves it out of the report.
        pointwise_alignment_pairs: None (default) computes the pointwise alignment of every pair of experts. An
            int ``m`` below the layer's ``E (E − 1) / 2`` pairs computes it exactly on ``m`` pairs drawn without
            replacement (seeded by ``seed``, the same on every rank): its mean over pairs is then an estimate with a
            standard error over pairs (``palign_mean_offdiag_se``), the unsampled entries of the matrix are NaN and
            its maximum is not reported (docs/geometry.md §4). At Qwen3-30B-A3B's size a pair costs about half a
            CPU minute; 8,128 pairs are the probe's largest cost.
        cka: linear CKA between the experts' outputs on every probe token (§4); skipped when E = 1, or when its
            ``E² D²`` cross products exceed ``pca_max_dim²``.
        subspaces: functional and representational Grassmann overlaps (§5); skipped when E = 1.
        pca_sites: any of ``"input"``, ``"hidden"``, ``"output"``.
        dtype: computation dtype (``torch.float64`` or ``torch.float32``).
        memory_budget_bytes: peak-memory budget of one token chunk.
        subspace_rank: ``r`` of the subspaces (capped at D).
        decay_fit_max: largest index in the decay-slope fit; None uses every singular value.
        jacobian_method: ``"auto"`` (the view's closed form if offered, else torch.func), ``"closed_form"``
            (require it: ``expert_jacobian``, or ``expert_jacobian_operator`` on the matrix-free path) or ``"func"``.
        layer_jacobian_method: ``"auto"``/``"compose"`` (product rule, reusing expert Jacobians) or ``"func"``.
        matrix_free_threshold: above this D no D × D Jacobian is formed. Experts whose view offers factored
            closed forms (MLP, SwiGLU) keep their Frobenius norms, alignment and functional subspaces exact, and
            their whole spectra when H < D (docs/geometry.md §1, "Factored experts at any width"); otherwise the
            spectra are the matrix-free top-``matrix_free_rank`` values and the quantities that need whole
            Jacobians (Frobenius norm, alignment, functional subspaces) are not computed.
        matrix_free_rank: number of singular values on the matrix-free path.
        matrix_free_oversample: extra columns ``p`` of the randomized block Krylov method
            (:func:`~moe_lightning.geometry.topr_singular_values`): ``K = r + p`` sets the convergence lag and the
            unit of ``matrix_free_max_iter``.
        matrix_free_max_iter: the basis holds at most ``K · matrix_free_max_iter`` columns per token.
        matrix_free_tol: relative tolerance on the values (tokens that miss it are counted in ``jac_unconverged``).
        matrix_free_trace_probes: Rademacher probes per token of the Hutchinson estimate of ``‖J‖_F²`` on the
            matrix-free path of experts without factors (docs/geometry.md §1, "Estimated quantities"); at least 2,
            for the standard error.
        matrix_free_slq_starts: random starts per token of the stochastic Lanczos quadrature that estimates the
            effective rank over the whole spectrum on the matrix-free path (where no exact core gives every
            singular value); at least 2, for the standard error.
        matrix_free_slq_steps: Lanczos steps per start (each one product with ``J`` and one with ``Jᵀ``).
        matrix_free_products_dtype: dtype of every matrix-free product with ``J`` and ``Jᵀ`` (the top-``r`` Krylov
            solve's, Hutchinson's and the quadrature's; matrix-free path only), or None for ``dtype``. The Krylov
            bases, Rayleigh–Ritz steps, Lanczos recurrences, probes and sums stay in ``dtype``; only the products round
            in this dtype. Their error on the top-``r`` values is below the solver's own tolerance, and on the
            estimates four orders of magnitude below the estimates' standard errors at ``D = 2048``
            (docs/geometry.md §1, "The products' precision"). The Grams of the pointwise alignment on a sample of
            the pairs (an estimate with its standard error over pairs) round in it too. It applies where the view
            casts what it reads
            (:class:`~moe_lightning.geometry.view.CastsOnRead`): on a float32 model the products then read the
            weights as they are, with no cast copy, and tokens of several chunks share each estimate's product.
        pca_max_dim: a PCA site wider than this is skipped (its ``Σw x xᵀ`` would be too large).
        seed: seed of the matrix-free start blocks (a local generator; the global RNG is untouched).
        cast_module: let the view module read copies of its floating parameters and buffers cast to ``dtype`` while
            it is probed (:func:`torch.func.functional_call`; the module's own tensors are never changed), so that
            the view's functions accept ``dtype`` inputs. A view that casts what it reads, one expert at a time
            (:class:`~moe_lightning.geometry.view.CastsOnRead`, as our layers' and the Hugging Face adapters' views
            do), is lent nothing: the copy of the whole layer would double a float32 layer's memory in float64.
        eval_mode: run the module in eval mode (each submodule's mode is restored afterwards).
        bootstrap: B, multinomial resamples of the probe tokens on which the bootstrapped quantities are recomputed
            (:mod:`~moe_lightning.geometry.bootstrap`); 0 (default) computes none.
        bootstrap_seed: seed of the resamples (a local generator): probes of as many tokens with the same seed
            share their resamples.
    """

    jacobian: bool = True
    layer_jacobian: bool = True
    pca: bool = True
    alignment: bool = True
    pointwise_alignment: bool = True
    pointwise_alignment_pairs: int | None = None
    cka: bool = True
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
    matrix_free_trace_probes: int = 16
    matrix_free_slq_starts: int = 4
    matrix_free_slq_steps: int = 30
    matrix_free_products_dtype: torch.dtype | None = torch.float32
    pca_max_dim: int = 4096
    seed: int = 0
    cast_module: bool = True
    eval_mode: bool = True
    bootstrap: int = 0
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ProbeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self.pca_sites = tuple(self.pca_sites)
        bad = [s for s in self.pca_sites if s not in PCA_SITES]
        if bad or len(set(self.pca_sites)) != len(self.pca_sites):
            raise ValueError(f"ProbeConfig.pca_sites must be distinct values of {PCA_SITES}, got {self.pca_sites!r}")
        check_choice("ProbeConfig.dtype", self.dtype, PROBE_DTYPES)
        products_dtype = self.matrix_free_products_dtype
        if isinstance(products_dtype, str):  # a name, as a YAML config gives it
            self.matrix_free_products_dtype = products_dtype = DTYPES.get(products_dtype, products_dtype)
        if products_dtype is not None:
            check_choice("ProbeConfig.matrix_free_products_dtype", products_dtype, PROBE_DTYPES)
        for name in _POSITIVE_INTS:
            check_positive_int(f"ProbeConfig.{name}", getattr(self, name))
        for name in _SAMPLE_SIZES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(
                    f"ProbeConfig.{name} must be an int >= 2 (a standard error needs 2 samples), got {value!r}"
                )
        oversample = self.matrix_free_oversample
        if not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 0:
            raise ValueError(f"ProbeConfig.matrix_free_oversample must be an int >= 0, got {oversample!r}")
        if not (isinstance(self.matrix_free_tol, (int, float)) and self.matrix_free_tol >= 0):
            raise ValueError(f"ProbeConfig.matrix_free_tol must be a float >= 0, got {self.matrix_free_tol!r}")
        pairs = self.pointwise_alignment_pairs
        if pairs is not None and (not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 2):
            raise ValueError(
                f"ProbeConfig.pointwise_alignment_pairs must be None (every pair) or an int >= 2 (a standard error "
                f"needs 2 pairs), got {pairs!r}"
            )
        if self.decay_fit_max is not None and (not isinstance(self.decay_fit_max, int) or self.decay_fit_max < 2):
            raise ValueError(f"ProbeConfig.decay_fit_max must be None or an int >= 2, got {self.decay_fit_max!r}")
        check_choice("ProbeConfig.jacobian_method", self.jacobian_method, JACOBIAN_METHODS)
        check_choice("ProbeConfig.layer_jacobian_method", self.layer_jacobian_method, LAYER_JACOBIAN_METHODS)
        for name in ("seed", "bootstrap_seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"ProbeConfig.{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.bootstrap, int) or isinstance(self.bootstrap, bool) or self.bootstrap < 0:
            raise ValueError(f"ProbeConfig.bootstrap must be an int >= 0 (resamples; 0 = none), got {self.bootstrap!r}")
