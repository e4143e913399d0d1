"""The probe in bounded memory at any width: no cast copy of a layer whose view casts what it reads, the pointwise
alignment of factored experts read a block of experts at a time, and reports that do not depend on the memory
budget (docs/geometry.md §1, "Factored experts at any width"; docs/design.md, the MoEView contract)."""

import copy
import importlib
import os
import sys

import pytest
import torch
from helpers import assert_same_report

from moe_lightning.adapters import find_moe_layers
from moe_lightning.common.memory import release_freed_memory
from moe_lightning.geometry import (
    CastsOnRead,
    ProbeConfig,
    probe,
    swiglu_expert_jacobian,
    swiglu_jacobian_operator,
)
from moe_lightning.geometry.alignment import pointwise_cosine_sums
from moe_lightning.geometry.factored import pointwise_cosine_sums_factored
from moe_lightning.nn.layer import MoEConfig, MoELayer

DT = torch.float64
probe_module = importlib.import_module("moe_lightning.geometry.probe")  # the package's ``probe`` is the function


@pytest.mark.parametrize("budget", [1, 2**31])
def test_blocked_factored_pointwise_alignment_equals_formed_jacobians(budget):
    """Blocks of one expert (budget 1 byte) or all at once: the cosine sums of formed Jacobians, an expert with zero
    output weights (no direction, left out of the counts) among them."""
    torch.manual_seed(0)
    d, h, n, e = 10, 4, 7, 5
    x = torch.randn(n, d, dtype=DT)
    weights = [
        [torch.randn(d, h, dtype=DT), torch.randn(d, h, dtype=DT), torch.randn(h, d, dtype=DT)] for _ in range(e)
    ]
    weights[3][2] = torch.zeros(h, d, dtype=DT)
    s, c = pointwise_cosine_sums_factored(lambda i: swiglu_jacobian_operator(x, *weights[i]).factors, e, n, budget)
    J_NEOI = torch.stack([swiglu_expert_jacobian(x, *w) for w in weights], 1)
    s_ref, c_ref = pointwise_cosine_sums(J_NEOI)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref)
    assert c[3].sum() == 0 and c[0, 1] == n


def test_sampled_pairs_read_only_the_experts_they_need():
    """With sampled pairs and blocks of two experts, each expert is read once for its own block (its norm, the
    diagonal) and again only for an earlier block's sampled pair that needs it: at most E + pairs reads, not every
    later block for every block; the sampled entries equal the formed Jacobians' and the others stay empty."""
    from moe_lightning.geometry.alignment import sampled_pairs

    torch.manual_seed(0)
    d, h, n, e = 10, 4, 7, 8
    x = torch.randn(n, d, dtype=DT)
    weights = [
        [torch.randn(d, h, dtype=DT), torch.randn(d, h, dtype=DT), torch.randn(h, d, dtype=DT)] for _ in range(e)
    ]
    reads = []

    def factors_of(i):
        reads.append(i)
        return swiglu_jacobian_operator(x, *weights[i]).factors

    per_expert = 8 * (d * h + 2 * h * (d + n))  # the function's own estimate of one expert's factors
    mask = sampled_pairs(e, 3, seed=1)
    s, c = pointwise_cosine_sums_factored(factors_of, e, n, 4 * per_expert, mask)
    assert len(reads) <= e + 3 and sorted(set(reads)) == list(range(e)), reads
    J_NEOI = torch.stack([swiglu_expert_jacobian(x, *w) for w in weights], 1)
    s_ref, c_ref = pointwise_cosine_sums(J_NEOI)
    torch.testing.assert_close(s[mask], s_ref[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c[mask], c_ref[mask])
    assert not bool(s[~mask].any()) and not bool(c[~mask].any())


def _wide_layer(seed=0, num_experts=4):
    torch.manual_seed(seed)
    config = MoEConfig(dim=24, expert_hidden=6, num_experts=num_experts, top_k=2, activation="swiglu")
    return MoELayer(config), torch.randn(20, 24)


def test_a_view_that_casts_on_read_is_lent_no_copy_and_equals_a_float64_layer(monkeypatch):
    """Our layers' views cast what they read: the float32 layer is lent nothing, its parameters stay as they were,
    and the report equals the probe of a float64 copy of the layer."""
    layer, x = _wide_layer()
    (view,) = find_moe_layers(layer)
    assert isinstance(view, CastsOnRead) and view.casts_weights_on_read()
    lent = []
    lend = probe_module.with_cast_copies
    monkeypatch.setattr(probe_module, "with_cast_copies", lambda m, dtype, fn: lent.append(dtype) or lend(m, dtype, fn))
    before = {name: (p.dtype, p.detach().clone()) for name, p in layer.named_parameters()}
    cfg = ProbeConfig(matrix_free_threshold=16, bootstrap=2)
    report = probe(view, x, cfg)
    assert lent == [None]
    for name, p in layer.named_parameters():
        assert p.dtype == before[name][0] and torch.equal(p, before[name][1]), name
    (view64,) = find_moe_layers(copy.deepcopy(layer).to(DT))
    assert_same_report(report, probe(view64, x.to(DT), cfg), rel=1e-10, abs_=1e-12, spectra=False)


def test_wide_report_does_not_depend_on_the_memory_budget():
    """A budget of one byte (one token a chunk, each expert's core and mean-Jacobian tokens and the pointwise
    alignment's tokens flushed as they come, blocks of one expert) gives the report of a budget that holds everything
    at once, bootstrap replicas included."""
    layer, x = _wide_layer(seed=1, num_experts=5)
    (view,) = find_moe_layers(layer)
    wide = dict(matrix_free_threshold=16, bootstrap=2, layer_jacobian=False, subspace_rank=3)
    small = probe(view, x, ProbeConfig(memory_budget_bytes=1, **wide))
    large = probe(view, x, ProbeConfig(memory_budget_bytes=2**31, **wide))
    assert small.variants["palign"].endswith("_exact_factored")
    assert small.variants["jac_source"] == "exact_factored_core"
    assert_same_report(small, large, rel=1e-9, abs_=1e-11, spectra=False)
    assert small.bootstrap["values"].keys() == large.bootstrap["values"].keys()
    for key, values in large.bootstrap["values"].items():
        torch.testing.assert_close(small.bootstrap["values"][key], values, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("threshold", [16, 1024])
def test_pointwise_alignment_false_leaves_it_out_and_nothing_else(threshold):
    layer, x = _wide_layer(seed=2)
    (view,) = find_moe_layers(layer)
    cfg = dict(matrix_free_threshold=threshold, layer_jacobian=False)
    without = probe(view, x, ProbeConfig(pointwise_alignment=False, **cfg))
    whole = probe(view, x, ProbeConfig(**cfg))
    assert not any(k.startswith("palign") for k in (*without.layer, *without.variants))
    assert "align_pointwise" not in without.matrices and "align_pointwise" in whole.matrices
    for key, value in without.layer.items():
        assert value == pytest.approx(whole.layer[key], rel=1e-12, nan_ok=True), key
    assert without.layer.keys() == {k for k in whole.layer if not k.startswith("palign")}


def test_pointwise_alignment_must_be_a_bool():
    with pytest.raises(ValueError, match="ProbeConfig.pointwise_alignment must be True or False"):
        ProbeConfig(pointwise_alignment="yes")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_freed_memory_returns_the_holes_glibc_keeps():
    """Blocks freed between live ones stay in glibc's heap (once its adaptive mmap threshold has risen past their
    size) and in the resident set; releasing them returns their pages, and nothing live is touched."""
    torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # an mmapped block freed: the threshold rises to 16 MB
    blocks = [torch.full((2**20,), float(i), dtype=torch.float32) for i in range(64)]  # 4 MB each, in the heap
    del blocks[::2]  # 128 MB of holes between live blocks
    before = _resident_bytes()
    assert release_freed_memory()
    after = _resident_bytes()
    assert before - after > 64 * 2**20, (before, after)
    assert all(bool((b == float(2 * i + 1)).all()) for i, b in enumerate(blocks))


def test_the_probe_hands_freed_pages_back_above_the_threshold_only(monkeypatch):
    """Above the matrix-free threshold the probe releases freed pages after each step and, in the steps that read
    every expert's weights (the pointwise alignment's Grams, the experts' queued cores), between the experts;
    below it, never."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import probe_plan
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    calls = []
    monkeypatch.setattr(probe_plan, "release_freed_memory", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=16, expert_hidden=6, num_experts=4, top_k=2, activation="swiglu")).double()
    (view,) = find_moe_layers(layer)
    x = torch.randn(6, 16, dtype=torch.float64)
    probe(view, x, ProbeConfig(pca=False, cka=False))
    assert calls == []
    wide = dict(matrix_free_threshold=8, pca=False, cka=False)
    probe(view, x, ProbeConfig(**wide))
    every, calls[:] = len(calls), []
    probe(view, x, ProbeConfig(alignment=False, jacobian=False, **wide))
    # a step after each accumulator's add and close, and between the experts: the alignment reads each of the 4
    # experts at least once (their norms), and the experts' cores close one expert at a time
    assert len(calls) > 0 and every - len(calls) >= 2 * 4, (every, len(calls))
