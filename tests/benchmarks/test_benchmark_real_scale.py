"""scripts/benchmark_real_scale.py's ``--timings``: each accumulator's steps are timed while the probe runs, the
probe's values do not change, and the methods are restored after."""

import time
from pathlib import Path

import torch
from helpers import load_script

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.geometry.accumulators.layer_jacobian import LayerJacobian
from moe_lightning.nn import MoEConfig, MoELayer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_real_scale.py"


def test_accumulator_timings_time_each_step_and_leave_the_probe_as_it_was():
    bench = load_script(SCRIPT)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=24, expert_hidden=16, num_experts=4, top_k=2, activation="swiglu")).double()
    (view,) = find_moe_layers(layer)
    x = torch.randn(32, 24, dtype=torch.float64)
    cfg = ProbeConfig(matrix_free_threshold=16, cka=False, pca=False, alignment=False, subspaces=False)
    add, top = LayerJacobian.__dict__["add"], LayerJacobian.__dict__["_top_values"]
    plain = probe(view, x, cfg)
    start = time.perf_counter()
    with bench.accumulator_timings() as spent:
        timed = probe(view, x, cfg)
    elapsed = time.perf_counter() - start
    for key in ("LayerJacobian.add", "LayerJacobian.close", "LayerJacobian top-r", "ExpertSpectra.add"):
        assert key in spent, sorted(spent)
    assert all(0 < seconds for seconds in spent.values()), spent
    # The steps run one after another inside the probe (the top-r solves inside the layer's add and close).
    steps = sum(seconds for key, seconds in spent.items() if key != "LayerJacobian top-r")
    assert steps <= elapsed
    assert spent["LayerJacobian top-r"] <= spent["LayerJacobian.add"] + spent["LayerJacobian.close"]
    assert LayerJacobian.__dict__["add"] is add and LayerJacobian.__dict__["_top_values"] is top
    assert timed.layer == plain.layer
    torch.testing.assert_close(timed.spectra["layer_jac_mean_spectrum"], plain.spectra["layer_jac_mean_spectrum"])
