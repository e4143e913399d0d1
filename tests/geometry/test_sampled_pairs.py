"""The pointwise alignment on a sample of the pairs of experts (``ProbeConfig.pointwise_alignment_pairs``,
docs/geometry.md §4): the sampled entries are the exact ones, the others are not reported, and the mean over pairs
is an estimate whose standard error matches a sample drawn without replacement."""

import math

import numpy as np
import pytest
import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.geometry.alignment import sampled_pairs, sampled_pairs_summary
from moe_lightning.nn.layer import MoEConfig, MoELayer

DT = torch.float64
ONLY_ALIGNMENT = dict(layer_jacobian=False, pca=False, cka=False, subspaces=False)


def _layer(dim, num_experts, seed):
    torch.manual_seed(seed)
    config = MoEConfig(dim=dim, expert_hidden=12, num_experts=num_experts, top_k=2, activation="swiglu")
    (view,) = find_moe_layers(MoELayer(config).to(DT))
    return view, torch.randn(24, dim, dtype=DT)


def test_sampled_pairs_are_a_seeded_symmetric_sample_without_replacement():
    mask = sampled_pairs(10, 7, seed=3)
    assert torch.equal(mask, mask.T) and bool(mask.diagonal().all())
    assert int(torch.triu(mask, diagonal=1).sum()) == 7
    assert torch.equal(mask, sampled_pairs(10, 7, seed=3)) and not torch.equal(mask, sampled_pairs(10, 7, seed=4))
    assert sampled_pairs(10, 45, seed=0) is None and sampled_pairs(10, None, seed=0) is None


@pytest.mark.parametrize("threshold", [1024, 15], ids=["exact_path", "factored_path"])
def test_sampled_entries_equal_every_pair_probe_and_the_rest_are_not_reported(threshold):
    """E = 8 (28 pairs), 6 sampled: on the exact path and on the factored path (which forms the Grams of the sampled
    pairs only) each sampled entry equals the probe of every pair to 1e-12; the others are NaN, the maximum is
    left out and the variant names the sample."""
    view, x = _layer(16, 8, seed=0)
    # the Grams in the probe's dtype (on the factored path a sample's round in float32 by default: the test below)
    exact = dict(matrix_free_threshold=threshold, matrix_free_products_dtype=None, **ONLY_ALIGNMENT)
    full = probe(view, x, ProbeConfig(**exact))
    sampled = probe(view, x, ProbeConfig(pointwise_alignment_pairs=6, **exact))
    mask = sampled_pairs(8, 6, seed=0)
    P, Q = full.matrices["align_pointwise"], sampled.matrices["align_pointwise"]
    torch.testing.assert_close(Q[mask], P[mask], rtol=1e-12, atol=1e-14)
    assert bool(Q[~mask].isnan().all())
    # the reference mean and its standard error, by numpy from the full matrix's sampled entries
    i, j = np.triu_indices(8, k=1)
    picked = mask.numpy()[i, j]
    values = P.numpy()[i, j][picked]
    assert sampled.layer["palign_mean_offdiag"] == pytest.approx(values.mean(), rel=1e-12)
    se = math.sqrt(values.var(ddof=1) / 6 * (1 - 6 / 28))
    assert sampled.layer["palign_mean_offdiag_se"] == pytest.approx(se, rel=1e-10)
    assert sampled.layer["palign_ratio"] == pytest.approx(values.mean() / full.layer["align_chance"], rel=1e-12)
    assert "palign_max_offdiag" not in sampled.layer and "palign_max_offdiag" in full.layer
    assert sampled.variants["palign"].endswith("_sampled_pairs=6_of_28")
    # the mean-Jacobian alignment is untouched
    torch.testing.assert_close(sampled.matrices["align_mean_jacobian"], full.matrices["align_mean_jacobian"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_grams_of_a_sample_lie_far_within_its_standard_error(seed):
    """Above the threshold a sample's Grams round in the matrix-free products' dtype (float32 by default): each
    sampled entry within 1e-5 of the float64 Grams' (relative), the mean within a thousandth of its standard error
    over pairs, and the variant says so. Every pair keeps float64 Grams."""
    view, x = _layer(64, 8, seed=seed)
    wide = dict(matrix_free_threshold=32, pointwise_alignment_pairs=6, **ONLY_ALIGNMENT)
    f64 = probe(view, x, ProbeConfig(matrix_free_products_dtype=None, **wide))
    f32 = probe(view, x, ProbeConfig(**wide))
    mask = sampled_pairs(8, 6, seed=0)
    P, Q = f64.matrices["align_pointwise"][mask], f32.matrices["align_pointwise"][mask]
    assert not torch.equal(P, Q)  # the float32 products did round
    torch.testing.assert_close(Q, P, rtol=1e-5, atol=0)
    diff = abs(f32.layer["palign_mean_offdiag"] - f64.layer["palign_mean_offdiag"])
    assert diff < 1e-3 * f64.layer["palign_mean_offdiag_se"]
    assert f32.variants["palign"].endswith("_sampled_pairs=6_of_28_grams_float32")
    assert f64.variants["palign"].endswith("_sampled_pairs=6_of_28")
    every = probe(view, x, ProbeConfig(matrix_free_threshold=32, **ONLY_ALIGNMENT))
    assert "grams" not in every.variants["palign"]


def test_standard_error_over_pairs_is_calibrated_over_samples():
    """Over 400 samples of 8 of the 66 pairs of one E = 12 matrix, the estimates' standardised errors against the
    mean over every pair have a root mean square near 1 (the finite-population correction included)."""
    view, x = _layer(8, 12, seed=1)
    P = probe(view, x, ProbeConfig(**ONLY_ALIGNMENT)).matrices["align_pointwise"]
    truth = float(P[torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)].mean())
    z = []
    for seed in range(400):
        mean, se = sampled_pairs_summary(P, sampled_pairs(12, 8, seed))
        z.append((mean - truth) / se)
    rms = float(np.sqrt(np.mean(np.square(z))))
    assert 0.8 < rms < 1.25, rms


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_pairs_must_be_at_least_two(bad):
    with pytest.raises(ValueError, match="ProbeConfig.pointwise_alignment_pairs must be None"):
        ProbeConfig(pointwise_alignment_pairs=bad)
