"""GeometryMonitor in real Trainer runs: logged values equal a direct probe, observation changes nothing,
resuming continues the same curve, and 2-process DDP gives the one-process values."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import run_test_script
from lightning.pytorch.loggers import CSVLogger

from moe_lightning.adapters import find_moe_layers
from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.lightning.modules import CausalLMModule, MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig, TransformerMoEConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = {"input_dim": 8, "output_dim": 8, "dim": 16, "expert_hidden": 16, "num_experts": 4}


def tiny_data(**kwargs):
    return SyntheticMoEDataModule(
        **{"input_dim": 8, "output_dim": 8, "num_train": 256, "num_val": 96, "batch_size": 32, **kwargs}
    )


def trainer(tmp_path=None, **kwargs):
    defaults = {
        "logger": CSVLogger(tmp_path) if tmp_path else False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    return L.Trainer(**{**defaults, **kwargs})


def read_rows(tmp_path):
    (path,) = list(Path(tmp_path).rglob("metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def row_at(rows, step, key):
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "") and int(r["step"]) == step]
    assert len(values) == 1, (key, step, values)
    return values[0]


@pytest.mark.parametrize("routing", ["topk", "soft", "dense"])
def test_logged_values_equal_a_direct_probe_of_independently_captured_inputs(routing, tmp_path):
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(routing=routing, num_blocks=2, **TINY))
    data = tiny_data()
    data.setup("fit")
    # reference, before any training: layer inputs computed by hand from the first validation batches
    x_val = torch.cat([x for x, _ in data.val_dataloader()])[:64]
    model = module.model
    with torch.no_grad():
        h = model.input_proj(x_val)
        inputs = []
        for block in model.blocks:
            z = block.norm(h)
            inputs.append(z)
            h = h + block.ffn(z)[0]
    views = find_moe_layers(model)
    config = ProbeConfig()
    expected = {}
    for view, z in zip(views, inputs):
        expected.update(probe(view, z[:40], config).scalars(f"geometry/{view.name}", max_experts=16))

    monitor = GeometryMonitor(every_n_steps=3, max_tokens=40)
    trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(module, data)
    rows = read_rows(tmp_path)
    assert monitor.probed_steps == [0, 3]
    assert [v.name for v in monitor.views] == ["blocks.0.ffn", "blocks.1.ffn"]
    keys = [k for k in expected if not math.isnan(expected[k])]
    assert len(keys) > 20
    for key in keys:
        assert row_at(rows, 0, key) == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    # the curve has a second point for every layer
    for view in views:
        assert math.isfinite(row_at(rows, 3, f"geometry/{view.name}/tokens/mean"))
    if routing == "dense":
        assert "geometry/blocks.0.ffn/align_mean_offdiag" not in rows[0]
    else:
        assert row_at(rows, 0, "geometry/blocks.0.ffn/align_chance") == pytest.approx(
            math.sqrt(2 / math.pi) / 16, rel=2e-3
        )  # docs/geometry.md §4: ≈


def fit_weights(module, data, callbacks, max_steps=6):
    trainer(None, max_steps=max_steps, callbacks=callbacks).fit(module, data)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# The same three monitors on an MLP MoE with router jitter, bit for bit, run by default in
# tests/callbacks/test_observation.py (one process in every precision, and 2 DDP ranks).
@pytest.mark.slow
def test_observation_never_changes_the_observed_mlp():
    # jitter noise draws from the global RNG in every training step: any RNG use by a callback would show
    results = []
    for with_callbacks in (False, True):
        L.seed_everything(0)
        module = MLPMoEModule(MLPMoEConfig(jitter_noise=0.2, **TINY))
        callbacks = (
            [
                GeometryMonitor(every_n_steps=2, max_tokens=32),
                RouterMonitor(log_every_n_steps=1),
                CurvatureMonitor(every_n_steps=3, eigen_max_iter=3, trace_max_samples=2),
            ]
            if with_callbacks
            else []
        )
        results.append(fit_weights(module, tiny_data(), callbacks))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


@pytest.mark.integration  # two fits with every callback, compared bit for bit
def test_observation_never_changes_the_observed_transformer():
    tokens = torch.randint(0, 40, (64, 9), generator=torch.Generator().manual_seed(0))
    dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    results = []
    for with_callbacks in (False, True):
        L.seed_everything(0)
        config = TransformerMoEConfig(
            vocab_size=40,
            dim=16,
            num_heads=2,
            num_layers=2,
            expert_hidden=16,
            num_experts=4,
            max_seq_len=8,
            dropout=0.1,
        )
        module = CausalLMModule(config, warmup_steps=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        callbacks = (
            [
                GeometryMonitor(every_n_steps=2, max_tokens=32, source="train"),
                RouterMonitor(log_every_n_steps=1),
                CurvatureMonitor(every_n_steps=3, eigen_max_iter=2, trace_max_samples=2),
            ]
            if with_callbacks
            else []
        )
        trainer(None, max_steps=5, callbacks=callbacks).fit(module, loader)
        results.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        if with_callbacks:
            assert callbacks[0].probed_steps == [0, 2, 4, 5]  # 5: the end of training
            assert callbacks[2].computed_steps == [0, 3, 5]
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_probe_restores_modes_and_leaves_no_hooks():
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(**TINY))
    data = tiny_data()
    monitor = GeometryMonitor(every_n_steps=100, max_tokens=16)
    t = trainer(None, max_steps=1, callbacks=[monitor])
    t.fit(module, data)
    module.train()
    module.model.blocks[0].norm.eval()  # a mixed state must come back exactly
    modes = [m.training for m in module.modules()]
    monitor.run_probe(t, module)
    assert [m.training for m in module.modules()] == modes
    assert all(not m._forward_hooks for m in module.modules())


@pytest.mark.integration  # a fit, a checkpoint and a resumed fit
def test_resume_continues_the_same_curve(tmp_path):
    def make():
        L.seed_everything(0)
        return MLPMoEModule(MLPMoEConfig(**TINY)), GeometryMonitor(every_n_steps=2, max_tokens=32)

    module, monitor = make()
    first = trainer(tmp_path / "a", max_steps=3, callbacks=[monitor])
    first.fit(module, tiny_data())
    checkpoint = tmp_path / "mid.ckpt"
    first.save_checkpoint(checkpoint)
    assert monitor.probed_steps == [0, 2, 3]  # 3: the end of training

    module2, monitor2 = make()
    trainer(tmp_path / "b", max_steps=6, callbacks=[monitor2]).fit(module2, tiny_data(), ckpt_path=checkpoint)
    assert monitor2.probed_steps == [0, 2, 3, 4, 6]  # no duplicate step 0, 2 or 3, none missing
    for a, b in zip(monitor.probe_inputs, monitor2.probe_inputs):
        assert torch.equal(a, b)
    logged_steps = sorted(
        {int(r["step"]) for r in read_rows(tmp_path / "b") if r.get("geometry/blocks.0.ffn/jac_sigma_max/mean")}
    )
    assert logged_steps == [4, 6]


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="every_n_steps"):
        GeometryMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="source='test'"):
        GeometryMonitor(source="test")
    with pytest.raises(ValueError, match="dtype"):
        GeometryMonitor(dtype="float16")
    with pytest.raises(ValueError, match="subspace_rank"):
        GeometryMonitor(subspace_rank=0)


@pytest.mark.integration  # two gloo processes
def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    run_test_script("ddp_geometry.py", out, tmp_path)
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["steps"] == [2, 3]  # 3: the end of training, on every rank
    ddp, single = data["ddp"], data["single"]
    assert ddp.keys() == single.keys() and len(ddp) > 50
    for key, value in single.items():
        if math.isnan(value):
            assert math.isnan(ddp[key]), key
        else:
            assert ddp[key] == pytest.approx(value, rel=1e-8, abs=1e-10), key
    # the bootstrap too: each rank adds its tokens' columns of one draw over the global probe set
    assert data["ddp_bootstrap"].keys() == data["single_bootstrap"].keys() and data["single_bootstrap"]
    for name, single_boot in data["single_bootstrap"].items():
        ddp_boot = data["ddp_bootstrap"][name]
        assert ddp_boot["replicates"] == 3 and ddp_boot["values"].keys() == single_boot["values"].keys()
        for key, values in single_boot["values"].items():
            assert ddp_boot["values"][key] == pytest.approx(values, rel=1e-8, abs=1e-10), (name, key)


def test_manual_forward_reference_for_layer_inputs_matches_capture():
    """capture_layer_inputs returns exactly the tensors each MoE layer receives."""
    from moe_lightning.adapters.capture import capture_layer_inputs
    from moe_lightning.common import observation

    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(num_blocks=2, **TINY))
    x = torch.randn(5, 8)
    views = find_moe_layers(module.model)
    with observation(module):
        captured = capture_layer_inputs(module, views, [x])
        h = module.model.input_proj(x)
        z0 = F.layer_norm(h, (16,), module.model.blocks[0].norm.weight, module.model.blocks[0].norm.bias)
    torch.testing.assert_close(captured["blocks.0.ffn"], z0)
    assert captured["blocks.1.ffn"].shape == (5, 16)
