"""The probe above ``matrix_free_threshold`` against the exact path: factored experts (our MLP and SwiGLU layers) get
every Jacobian quantity exactly, from their factors (docs/geometry.md §1, "Factored experts at any width")."""

import math
import warnings

import pytest
import torch
from helpers import assert_same_report

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.native import NativeMoEView
from moe_lightning.geometry import ProbeConfig, finalize, probe, probe_statistics
from moe_lightning.nn.layer import MoEConfig, MoELayer

DT = torch.float64
# Quantities the wide path leaves as they were (no layer Jacobian, no CKA: their paths are not the experts'). One
# chunk on both paths, so that the PCA moments they share are summed in the same order: with a few tokens an
# expert, a representational subspace's eigen-gap is small enough to show the order's round-off.
FAST = dict(layer_jacobian=False, cka=False, subspace_rank=3, memory_budget_bytes=2**31)


def _layer(dim, hidden, activation, seed, num_experts=3, dtype=DT):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(dim=dim, expert_hidden=hidden, num_experts=num_experts, top_k=2, activation=activation))
    (view,) = find_moe_layers(layer.to(dtype))
    return view, torch.randn(8, dim, dtype=dtype)


def _check_against_exact(dim, hidden, activation, seed, tokens=6):
    view, x = _layer(dim, hidden, activation, seed)
    x = x[:tokens]
    exact = probe(view, x, ProbeConfig(**FAST))
    wide = probe(view, x, ProbeConfig(matrix_free_threshold=dim - 1, **FAST))
    assert_same_report(wide, exact, rel=1e-6, abs_=1e-9)
    v = wide.variants
    assert v["jac_source"] == "exact_factored_core" and v["jac_effective_rank"].endswith("_exact_factored_core")
    assert v["align"].endswith("_exact_factored") and v["subspace_fun"].endswith("_exact_factored")
    assert exact.variants["jac_effective_rank"] == "roy_vetterli_2007"  # the exact path is unchanged


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_factored_experts_above_the_threshold_equal_the_exact_path(activation):
    """D = 512, H = 24 < D: the whole spectrum from the core, Frobenius norms, both alignments and the functional
    subspaces equal the exact path's (formed 512 x 512 Jacobians) to 1e-6, with the same keys; only the variants
    name the path."""
    _check_against_exact(512, 24, activation, 0, tokens=4)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_factored_experts_equal_the_exact_path_over_seeds(activation, seed):
    """The same check on more draws of weights and tokens, at D = 64 (H = 20) to stay fast."""
    _check_against_exact(64, 20, activation, seed, tokens=8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(("dim", "hidden"), [(512, 24), (1024, 48)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_factored_experts_at_512_and_1024_equal_the_exact_path(activation, dim, hidden, seed):
    _check_against_exact(dim, hidden, activation, seed, tokens=8)


def test_wide_factored_hidden_at_least_d_has_exact_frobenius_alignment_and_subspaces():
    """H >= D: no small core, so the spectra stay the matrix-free top-r values; the Frobenius norm, the stable rank
    (with the Krylov sigma_max), both alignments and the functional subspaces are still exact, on a float32 layer
    probed in float64, with the bootstrap's resampled alignment too."""
    view, x = _layer(24, 32, "swiglu", 0, dtype=torch.float32)
    kw = dict(FAST, matrix_free_tol=1e-12, matrix_free_max_iter=200, bootstrap=3)
    exact = probe(view, x, ProbeConfig(**kw))
    wide = probe(view, x, ProbeConfig(matrix_free_threshold=23, **kw))
    for key in ("jac_frobenius", "jac_frobenius_std", "jac_stable_rank", "jac_sigma_max"):
        torch.testing.assert_close(wide.expert[key], exact.expert[key], rtol=1e-6, atol=1e-9, msg=key)
    for key in ("align_mean_offdiag", "palign_max_offdiag", "align_ratio", "subspace_fun_overlap"):
        assert wide.layer[key] == pytest.approx(exact.layer[key], rel=1e-6), key
    for key in ("align_mean_jacobian", "align_pointwise", "subspace_fun_geodesic"):
        torch.testing.assert_close(wide.matrices[key], exact.matrices[key], rtol=1e-6, atol=1e-9, equal_nan=True)
    for key in ("align_mean_offdiag", "jac_frobenius/mean", "jac_stable_rank/mean"):
        assert wide.bootstrap["values"][key] == pytest.approx(exact.bootstrap["values"][key], rel=1e-6), key
    assert wide.variants["jac_frobenius"] == "sqrt_sum_sigma_sq_exact_factored"
    # the whole spectrum's effective rank is estimated (tests/geometry/test_wide_estimates.py); the decay slope is
    # the top-r values' and named so
    assert wide.variants["jac_effective_rank"] == "roy_vetterli_2007_slq_m30_s4_products_float32"
    assert wide.variants["jac_decay_slope"].startswith("loglog_lsq_positive_sigma_on_top16")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_wide_factored_statistics_of_two_shards_sum_to_one_process(activation):
    """The factored mean Jacobian's Σ w·s is additive: two shards' statistics summed equal one probe of the union,
    with an expert that has no token on one shard."""
    view, x = _layer(40, 12, activation, 3)
    x = torch.randn(30, 40, dtype=DT)
    cfg = ProbeConfig(matrix_free_threshold=39, **FAST)
    order = torch.argsort((view.gates(x)[:, 1] > 0).to(torch.int64), stable=True)
    x = x[order]
    split = int((view.gates(x)[:, 1] == 0).sum())
    shards = [probe_statistics(view, s, cfg) for s in (x[:split], x[split:])]
    assert shards[0].tensors["count"][1] == 0
    summed, whole = finalize(shards), probe(view, x, cfg)
    a, b = whole.scalars("g"), summed.scalars("g")
    assert "g/align_mean_offdiag" in a and a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12, nan_ok=True), key


def test_wide_factored_alignment_is_not_reported_when_the_weights_cannot_be_read(monkeypatch):
    """The statistics hold Σ w·s, not the weights; finalising reads the weights again. Where it cannot (sharded, on
    another rank), the alignment and the functional subspaces are not reported and a warning says why."""
    view, x = _layer(40, 12, "swiglu", 0)
    stats = probe_statistics(view, x, ProbeConfig(matrix_free_threshold=39, **FAST))

    def unreadable(self, e, x_ND):
        raise RuntimeError("the weights are sharded")

    monkeypatch.setattr(NativeMoEView, "expert_jacobian_operator", unreadable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = finalize(stats)
    messages = [str(w.message) for w in caught]
    assert any("mean-Jacobian alignment is not reported" in m and "sharded" in m for m in messages)
    assert any("functional subspaces is not reported" in m for m in messages)
    assert "align_mean_offdiag" not in report.layer and "align_mean_jacobian" not in report.matrices
    assert "subspace_fun_overlap" not in report.layer and "subspace_rep_overlap" in report.layer
    assert report.variants["align"] == "unavailable_weights_not_readable_at_finalize"
    assert not math.isnan(report.layer["palign_mean_offdiag"])  # computed while the weights were lent
