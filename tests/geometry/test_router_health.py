"""Router health and window sums (geometry/router.py) against hand-computed loads and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import numpy_health


def test_router_health_uniform_collapsed_and_empty_loads():
    from moe_lightning.geometry import router_health

    uniform = router_health(torch.full((8,), 5.0))
    assert uniform == pytest.approx(
        {"utilisation_p50": 1.0, "utilisation_p90": 1.0, "utilisation_max": 1.0, "dead_fraction": 0.0, "diversity": 1.0}
    )
    # one expert takes all 40 assignments: utilisation E there, 0 elsewhere (p90 at sorted position 0.9 * 7 = 6.3:
    # 0.3 * 8); 7 of 8 dead; diversity exp(0) / E
    collapsed = router_health(torch.tensor([0, 0, 40, 0, 0, 0, 0, 0]))
    assert collapsed == pytest.approx(
        {
            "utilisation_p50": 0.0,
            "utilisation_p90": 2.4,
            "utilisation_max": 8.0,
            "dead_fraction": 7 / 8,
            "diversity": 1 / 8,
        }
    )
    # loads (6, 2, 0, 0) over ideal 2: utilisation (3, 1, 0, 0); p50 = 0.5, p90 = 1 + 0.7 * 2 = 2.4 (linear)
    mixed = router_health(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    expected_diversity = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 4
    assert mixed == pytest.approx(
        {"utilisation_p50": 0.5, "utilisation_p90": 2.4, "utilisation_max": 3.0, "dead_fraction": 0.5,
         "diversity": expected_diversity}
    )  # fmt: skip
    assert mixed == pytest.approx(numpy_health(np.array([6.0, 2.0, 0.0, 0.0])))
    empty = router_health(torch.zeros(4))
    assert empty["dead_fraction"] == 1.0
    assert all(math.isnan(empty[k]) for k in ("utilisation_p50", "utilisation_p90", "utilisation_max", "diversity"))


def test_routing_sums_of_two_batches_are_the_sums_of_their_union():
    from moe_lightning.geometry.router import routing_sums, window_statistics

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(30, 5, generator=gen, dtype=torch.float64), -1)
    gates = torch.where(probs >= probs.topk(2, -1).values[:, 1:], probs, 0.0)
    union = window_statistics(routing_sums(gates, probs))
    split = window_statistics(routing_sums(gates[:11], probs[:11]) + routing_sums(gates[11:], probs[11:]))
    torch.testing.assert_close(union.pop("load"), split.pop("load"))
    assert union == pytest.approx(split)
