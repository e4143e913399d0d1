"""GeometryMonitor's probe set sized per expert (``min_tokens_per_expert`` within ``max_tokens``) and its bootstrap
over probe tokens: against probes of independently captured tokens, the budget warning, unchanged weights."""

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.common import observation
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig

TINY = {"input_dim": 8, "output_dim": 8, "dim": 16, "expert_hidden": 16, "num_experts": 4}


def fit(module, monitor, max_steps=1, **kwargs):
    data = SyntheticMoEDataModule(input_dim=8, output_dim=8, num_train=128, num_val=480, batch_size=16)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[monitor] if monitor else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, data)
    return trainer


def captured_tokens(module, inputs):
    views = find_moe_layers(module.model)
    with observation(module):
        return views, capture_layer_inputs(module, views, inputs)


def test_min_tokens_per_expert_draws_batches_until_every_experts_n_eff_reaches_it():
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(num_blocks=2, **TINY))
    initial = copy.deepcopy(module)
    pca_only = {"jacobian": False, "layer_jacobian": False, "alignment": False, "subspaces": False}
    monitor = GeometryMonitor(every_n_steps=None, max_tokens=400, min_tokens_per_expert=15, **pca_only)
    fit(module, monitor)
    batches = monitor.probe_inputs
    assert 1 < len(batches) < 25  # more than one batch, fewer than the budget's
    # reference: n_eff of every expert from a float64 probe of the captured tokens, on the weights of the draw
    views, full = captured_tokens(initial, batches)
    _, short = captured_tokens(initial, batches[:-1])
    cfg = ProbeConfig(**pca_only)
    lowest = min(float(probe(v, full[v.name], cfg).n_eff.min()) for v in views)
    lowest_short = min(float(probe(v, short[v.name], cfg).n_eff.min()) for v in views)
    assert lowest >= 15 > lowest_short  # reached, and not one batch earlier
    # what the monitor probed is that set
    for v in views:
        assert monitor.last_reports[v.name].total_tokens == full[v.name].shape[0] == 16 * len(batches)


def test_the_budget_running_out_first_is_a_warning_and_the_budget_is_kept():
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(**TINY))
    monitor = GeometryMonitor(every_n_steps=None, max_tokens=40, min_tokens_per_expert=10_000)
    with pytest.warns(UserWarning, match=r"max_tokens=40\) leaves expert \d of 'blocks.0.ffn' with n_eff"):
        fit(module, monitor)
    assert len(monitor.probe_inputs) == 3  # 16-token batches up to the 40-token budget
    assert monitor.last_reports["blocks.0.ffn"].total_tokens == 40


def test_bootstrap_of_the_monitor_equals_a_direct_probe_and_is_saved(tmp_path):
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(routing="soft", **TINY))
    initial = copy.deepcopy(module)
    monitor = GeometryMonitor(every_n_steps=None, max_tokens=40, bootstrap=3, report_dir=str(tmp_path))
    fit(module, monitor)
    views, captured = captured_tokens(initial, monitor.probe_inputs)
    # the fit-start probe (on the initial weights) and the one at the end of training
    assert sorted(p.name for p in Path(tmp_path, "geometry").glob("step_*.json")) == [
        "step_0000000.json",
        "step_0000001.json",
    ]
    saved = json.loads(Path(tmp_path, "geometry", "step_0000000.json").read_text())["layers"]
    for v in views:
        expected = probe(v, captured[v.name][:40], ProbeConfig(bootstrap=3)).bootstrap
        layer = saved[v.name]
        assert layer["dim"] == 16 and layer["bootstrap"]["replicates"] == 3 and layer["bootstrap"]["seed"] == 0
        assert layer["bootstrap"]["values"].keys() == expected["values"].keys()
        for key, values in expected["values"].items():
            assert layer["bootstrap"]["values"][key] == pytest.approx(values, rel=1e-9, abs=1e-12), key


def test_sized_probe_set_and_bootstrap_never_change_the_observed():
    weights = []
    for monitor in (None, GeometryMonitor(every_n_steps=2, max_tokens=200, min_tokens_per_expert=12, bootstrap=2)):
        L.seed_everything(0)
        module = MLPMoEModule(MLPMoEConfig(jitter_noise=0.2, **TINY))
        fit(module, monitor, max_steps=4)
        weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_bad_sizing_options_name_the_field():
    with pytest.raises(ValueError, match="min_tokens_per_expert"):
        GeometryMonitor(min_tokens_per_expert=0)
    with pytest.raises(ValueError, match="ProbeConfig.bootstrap"):
        GeometryMonitor(bootstrap=-2)
