"""The bootstrap over probe tokens: each resample's values against probe() on the literally repeated tokens, the
plain values unchanged, DDP-style shards of one global draw, the resample counts, bad input."""

import json
import math

import pytest
import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, finalize, probe, probe_statistics
from moe_lightning.geometry.bootstrap import BOOTSTRAP_QUANTITIES, resample_counts
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

DT = torch.float64
B = 3


def moe_view(routing="topk", num_experts=4, dim=6, hidden=5):
    torch.manual_seed(0)
    config = MLPMoEConfig(
        input_dim=dim, output_dim=2, dim=dim, expert_hidden=hidden, num_experts=num_experts, routing=routing
    )
    return find_moe_layers(MLPMoE(config))[0]


def tokens(n=30, dim=6, seed=1):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_each_resample_equals_probe_on_the_repeated_tokens(routing):
    view, x = moe_view(routing), tokens()
    cfg = ProbeConfig(subspace_rank=2, bootstrap=B, bootstrap_seed=7)
    report = probe(view, x, cfg)
    counts = resample_counts(x.shape[0], B, 7)
    values = report.bootstrap["values"]
    assert report.bootstrap["replicates"] == B and report.bootstrap["seed"] == 7
    assert set(values) == set(BOOTSTRAP_QUANTITIES)  # every quantity is on: all of them, B values each
    plain = ProbeConfig(subspace_rank=2)
    for b in range(B):
        repeated = x.repeat_interleave(counts[b].long(), dim=0)  # the resample, token by token
        reference = probe(view, repeated, plain).scalars("")
        for key, vals in values.items():
            assert len(vals) == B
            assert vals[b] == pytest.approx(reference[f"/{key}"], rel=1e-9, abs=1e-12), (b, key)
    # the resamples differ from one another and from the plain value: they are not copies of it
    assert len(set(values["jac_sigma_max/mean"])) == B


def test_plain_values_are_unchanged_by_the_bootstrap():
    view, x = moe_view(), tokens()
    with_boot = probe(view, x, ProbeConfig(bootstrap=4)).to_dict()
    without = probe(view, x, ProbeConfig()).to_dict()
    assert "bootstrap" not in without and with_boot.pop("bootstrap")["replicates"] == 4
    assert json.dumps(with_boot) == json.dumps(without)  # bit for bit, NaN included


@pytest.mark.parametrize("ranks", [2, 4])
def test_shards_of_one_global_draw_sum_to_the_one_process_bootstrap(ranks):
    view, x = moe_view(), tokens(n=31)
    cfg = ProbeConfig(bootstrap=B, bootstrap_seed=3)
    single = probe(view, x, cfg).bootstrap
    counts = resample_counts(x.shape[0], B, 3)
    shards = [
        probe_statistics(view, part, cfg, resample_counts=c)
        for part, c in zip(x.tensor_split(ranks), counts.tensor_split(ranks, dim=1), strict=True)
    ]
    sharded = finalize(shards).bootstrap
    for key, vals in single["values"].items():
        assert sharded["values"][key] == pytest.approx(vals, rel=1e-9, abs=1e-12), key


def test_an_expert_no_resampled_token_reaches_gives_nan_not_an_error():
    view = moe_view(num_experts=4)
    x = tokens(n=1)  # one token: a resample holds it once, so experts it is not routed to stay empty
    values = probe(view, x, ProbeConfig(bootstrap=2)).bootstrap["values"]
    plain = probe(view, x, ProbeConfig()).scalars("")
    for key, vals in values.items():
        ref = plain[f"/{key}"]
        assert all((math.isnan(v) and math.isnan(ref)) or v == pytest.approx(ref, rel=1e-9) for v in vals), key


def test_resample_counts_are_multinomial_draws_shared_by_seed():
    counts = resample_counts(50, 4, seed=5)
    assert counts.shape == (4, 50) and counts.dtype == DT
    assert (counts.sum(1) == 50).all() and (counts >= 0).all() and (counts == counts.round()).all()
    gen = torch.Generator().manual_seed(5)
    draws = torch.randint(50, (4, 50), generator=gen)
    expected = torch.stack([torch.bincount(row, minlength=50) for row in draws]).to(DT)
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    assert torch.equal(resample_counts(50, 4, seed=5), counts)
    assert not torch.equal(resample_counts(50, 4, seed=6), counts)


def test_round_trip_keeps_the_bootstrap():
    from moe_lightning.geometry import GeometryReport

    report = probe(moe_view(), tokens(), ProbeConfig(bootstrap=2))
    data = json.loads(json.dumps(report.to_dict()))
    assert GeometryReport.from_dict(data).to_dict()["bootstrap"] == data["bootstrap"]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ProbeConfig(bootstrap=-1), "ProbeConfig.bootstrap"),
        (lambda: ProbeConfig(bootstrap=True), "ProbeConfig.bootstrap"),
        (lambda: ProbeConfig(bootstrap_seed=1.5), "ProbeConfig.bootstrap_seed"),
        (lambda: probe_statistics(moe_view(), tokens(), ProbeConfig(bootstrap=2), resample_counts=torch.ones(3, 30)),
         "resample_counts"),
        (lambda: probe_statistics(moe_view(), tokens(), ProbeConfig(), resample_counts=torch.ones(2, 30)),
         "resample_counts"),
        (lambda: resample_counts(-1, 2, 0), "num_tokens"),
    ],
)  # fmt: skip
def test_bad_bootstrap_input_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
