"""The token path of the weighted PCA (docs/geometry.md §3): from the routed tokens, with an ``n × n`` Gram matrix when
an expert sees fewer tokens than its site is wide, equal to the moments path on the same tokens."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import run_test_script

from moe_lightning.geometry import ProbeConfig, finalize, probe, probe_statistics
from moe_lightning.geometry.bootstrap import resample_counts
from moe_lightning.geometry.pca import moments, pca_from_moments, pca_from_tokens, pca_ranks, pca_ranks_from_tokens

DT = torch.float64
WIDE, HIDDEN = 256, 96
QUANTITIES = ("effective_rank", "participation_ratio", "n90", "n_eff", "undersampled")


def _projector(vectors_DK, r):
    q = vectors_DK[:, :r]
    return q @ q.T


def _tokens(n, d, seed, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    # a mean far from 0 and unequal scales: the moments path cancels digits, as on real activations
    z = offset + torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.1, 2.0, d, dtype=DT)
    w = torch.rand(n, generator=g, dtype=DT) + 0.05
    return z, w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 9, 40, 300])
def test_pca_from_tokens_equals_moments_path(seed, n):
    z, w = _tokens(n, 64 if n == 300 else WIDE, seed)
    got, ref = pca_from_tokens(z, w, min_vectors=8), pca_from_moments(*moments(z, w))
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got.mean, ref.mean, rtol=1e-12, atol=1e-12)
    for q in ("total_weight", "num_tokens", *QUANTITIES):
        assert getattr(got, q) == pytest.approx(getattr(ref, q), rel=1e-8), q
    # the eigenvectors of distinct positive eigenvalues: the same directions
    r = min(8, n - 1)
    if r > 0:
        torch.testing.assert_close(_projector(got.eigenvectors, r), _projector(ref.eigenvectors, r), atol=1e-7, rtol=0)
    k = got.eigenvectors.shape[1]
    assert k == (z.shape[1] if n >= z.shape[1] else max(n, 8))
    torch.testing.assert_close(got.eigenvectors.T @ got.eigenvectors, torch.eye(k, dtype=DT), atol=1e-8, rtol=0)


def test_pca_from_tokens_of_no_tokens_is_nan():
    res = pca_from_tokens(torch.zeros(0, WIDE, dtype=DT), torch.zeros(0, dtype=DT))
    assert res.total_weight == 0 and res.num_tokens == 0 and res.undersampled
    assert torch.isnan(res.eigenvalues).all() and res.eigenvectors.shape == (WIDE, 0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, d", [(12, WIDE), (40, 16)])
def test_pca_ranks_from_tokens_equals_pca_ranks_of_resampled_moments(seed, n, d):
    z, w = _tokens(n, d, seed)
    counts_BN = resample_counts(n, 5, seed).to(DT)
    w_BN = counts_BN * w
    sum_wx = w_BN @ z
    sum_wxx = torch.einsum("bn,ni,nj->bij", w_BN, z, z)
    ref = pca_ranks(w_BN.sum(-1), (w_BN * w_BN).sum(-1), sum_wx, sum_wxx)
    # a budget of one resample's moments at a time on the N >= D path
    got = pca_ranks_from_tokens(z, w_BN, memory_budget_bytes=3 * d * d * 8)
    for q in QUANTITIES:
        torch.testing.assert_close(got[q], ref[q], rtol=1e-8, atol=1e-8, msg=q)


class WideView:
    """A top-2 MoE of gated (SwiGLU) experts wider than its tokens: every expert sees fewer tokens than ``D``."""

    def __init__(self, num_experts=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.module, self.num_experts = "wide", None, num_experts
        self.router = torch.randn(WIDE, num_experts, generator=g, dtype=DT)
        shapes = ((WIDE, HIDDEN), (WIDE, HIDDEN), (HIDDEN, WIDE))  # gate, up, down
        self.w = [
            tuple(torch.randn(*s, generator=g, dtype=DT) * WIDE**-0.5 for s in shapes) for _ in range(num_experts)
        ]

    def gates(self, x):
        vals, idx = (x @ self.router).topk(2, dim=-1)
        return torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(-1, idx, vals.softmax(-1))

    def expert_hidden(self, e):
        gate, up, _ = self.w[e]
        return lambda x: F.silu(x @ gate) * (x @ up)

    def expert(self, e):
        return lambda x: self.expert_hidden(e)(x) @ self.w[e][2]

    def expert_jacobian(self, e, x):
        return None


# Representational quantities only: the Jacobians' cost at D = 256 is not what these tests are about.
BASE = dict(jacobian=False, layer_jacobian=False, alignment=False, cka=False, subspace_rank=4)
MOMENTS = ProbeConfig(**BASE)  # E·D² float64 = 2 MiB: within the default budget
TOKENS = ProbeConfig(**BASE, memory_budget_bytes=2**20)  # the moments exceed it: token path


def _x(n, seed):
    return 0.5 + torch.randn(n, WIDE, generator=torch.Generator().manual_seed(100 + seed), dtype=DT)


def _assert_same_report(got, ref):
    """Every value equal. An expert with too few tokens for its representational subspace (fewer than ``rank``
    nonzero eigenvalues of its covariance: the rest of a basis would be an arbitrary completion) has NaN distances on
    both paths, left out of the layer's means."""
    a, b = got.scalars("g"), ref.scalars("g")
    assert a.keys() == b.keys()
    for k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-10, nan_ok=True), k
    assert got.matrices.keys() == ref.matrices.keys()
    for k, M in ref.matrices.items():
        torch.testing.assert_close(got.matrices[k], M, rtol=1e-7, atol=1e-7, equal_nan=True, msg=k)
    assert got.variants == ref.variants


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_token_path_equals_moments_path(seed):
    view, x = WideView(seed=seed), _x(24, seed)
    stats = probe_statistics(view, x, TOKENS)
    # the D-wide sites keep rows and allocate no D x D moments; the narrow hidden site's moments fit the budget
    assert {slot.name for slot in stats.rows} == {"pca/input/tokens", "pca/output/tokens"}
    assert {slot.name.split("/")[1] for slot in stats.slots if "sum_wzz" in slot.name} == {"hidden"}
    assert sum(int(rows.shape[0]) for rows in stats.rows.values()) == 2 * 2 * 24  # top-2, two sites
    ref_stats = probe_statistics(view, x, MOMENTS)
    assert not ref_stats.rows and stats.buffer.numel() < ref_stats.buffer.numel() // 10
    _assert_same_report(finalize(stats), finalize(ref_stats))


def test_token_path_subspaces_equal_moments_path_with_an_empty_expert():
    view, x = WideView(num_experts=6, seed=3), _x(30, 3)
    got, ref = probe(view, x, TOKENS), probe(view, x, MOMENTS)
    _assert_same_report(got, ref)
    assert bool((ref.tokens < 5).any())  # an expert whose subspace is not determined (its gap is 0)
    assert int((ref.tokens >= 5).sum()) >= 2  # and pairs of experts whose overlaps are compared
    overlap, determined = ref.matrices["subspace_rep_overlap"], ref.tokens >= 5
    assert overlap[~determined].isnan().all() and overlap[:, ~determined].isnan().all()
    off = overlap[determined][:, determined][~torch.eye(int(determined.sum()), dtype=torch.bool)]
    assert ref.layer["subspace_rep_overlap"] == pytest.approx(float(off.mean()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_two_shards_gathered_equal_one_process_on_the_union(seed):
    view, x = WideView(seed=seed), _x(26, seed)
    shards = [x[:11], x[11:]]
    full = probe(view, x, TOKENS)
    stats = [probe_statistics(view, s, TOKENS) for s in shards]
    _assert_same_report(finalize(stats), full)  # summed buffers, concatenated rows
    flats = [s.flatten() for s in stats]
    calls = []

    def fake_reduce(t):
        calls.append(("sum", tuple(t.shape)))
        return flats[0] + flats[1]

    def fake_gather(rank):
        def gather(t):
            calls.append(("gather", t.shape[1]))
            slot = list(stats[rank].rows)[len(calls) - 2]  # the row slots, in allocation order
            assert torch.equal(stats[rank].rows[slot], t)
            return torch.cat([s.rows[slot] for s in stats])

        return gather

    for rank, shard in enumerate(shards):
        calls.clear()
        _assert_same_report(probe(view, shard, TOKENS, reduce_fn=fake_reduce, gather_fn=fake_gather(rank)), full)
        # one sum of a data-independent length, one gather per site's rows
        assert calls[0] == ("sum", tuple(flats[0].shape)) and [c[0] for c in calls[1:]] == ["gather"] * 2
    with pytest.raises(ValueError, match="gather_fn"):
        probe(view, shards[0], TOKENS, reduce_fn=fake_reduce)


def test_token_path_bootstrap_equals_moments_path():
    view, x = WideView(seed=4), _x(20, 4)
    tokens, moments_cfg = (
        ProbeConfig(**{**BASE, "subspaces": False}, bootstrap=6, memory_budget_bytes=budget)
        for budget in (2**20, 2**27)
    )
    got, ref = probe(view, x, tokens), probe(view, x, moments_cfg)
    assert probe_statistics(view, x, tokens).rows and not probe_statistics(view, x, moments_cfg).rows
    assert got.bootstrap["values"].keys() == ref.bootstrap["values"].keys()
    assert any(k.startswith("pca_hidden") for k in ref.bootstrap["values"])
    for k, values in ref.bootstrap["values"].items():
        assert got.bootstrap["values"][k] == pytest.approx(values, rel=1e-8, nan_ok=True), k


@pytest.mark.integration  # two gloo processes
def test_two_process_ddp_gathers_the_token_rows(tmp_path):
    out = tmp_path / "ddp.json"
    run_test_script("ddp_pca_tokens.py", out, tmp_path, torchrun=2)
    data = json.loads(out.read_text())
    assert data["gathered"] == [0.0] * 3 + [1.0] * 5 and data["token_path"]
    assert min(data["tokens"]) >= 5  # every representational subspace is determined: every value is compared
    ddp, single = data["ddp"], data["single"]
    assert ddp.keys() == single.keys()
    for k, value in single.items():
        assert ddp[k] == pytest.approx(value, rel=1e-8, abs=1e-10, nan_ok=True), k
