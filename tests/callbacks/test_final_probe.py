"""The end of training: a probe at a run's last step however the schedule falls, a warning (from the monitor and from
the report) when a run's last values lie far from its last step all the same, and weights that hold NaN/Inf named as
weights, with the step, once until they recover."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import logged, read_metrics
from lightning.pytorch.loggers import CSVLogger

from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.results import results_table, seed_values
from moe_lightning.analysis.steps import stale_final_values
from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor
from moe_lightning.callbacks._health import LayerIncidents
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.geometry import probe
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig

TINY = {"input_dim": 8, "output_dim": 8, "dim": 8, "expert_hidden": 8, "num_experts": 4, "routing": "topk"}
CHEAP = {"max_tokens": 32, "layer_jacobian": False, "log_media": False}
SIGMA = "geometry/blocks.0.ffn/jac_sigma_max/mean"


def fit(tmp_path: Path, callbacks: list, max_steps: int) -> tuple[L.Trainer, MLPMoEModule, list[str]]:
    """A tiny MLP MoE trained ``max_steps`` steps with a CSV log in ``tmp_path``; the monitors' warnings."""
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(**TINY))
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = SyntheticMoEDataModule(input_dim=8, output_dim=8, num_train=128, num_val=32, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    # what `moe-lightning fit` saves beside the log, and the report reads the routing and seed from
    cli_config = {"seed_everything": 0, "model": {"class_path": "MLPMoEModule", "init_args": {"config": TINY}}}
    Path(trainer.logger.log_dir, "config.yaml").write_text(yaml.safe_dump(cli_config))
    return trainer, module, [str(w.message) for w in caught if "Monitor" in str(w.message)]


def test_a_run_cut_short_of_its_schedule_is_probed_at_its_last_step(tmp_path):
    geometry = GeometryMonitor(every_n_steps=4, **CHEAP)
    curvature = CurvatureMonitor(every_n_steps=4, eigen_max_iter=3, trace_max_samples=2, density=False)
    trainer, module, warned = fit(tmp_path, [geometry, curvature], max_steps=5)
    assert warned == []
    assert geometry.probed_steps == [0, 4, 5] and curvature.computed_steps == [0, 4, 5]
    # the step-5 probe is that of the trained model: a direct probe of its captured inputs gives the same value
    folder = Path(trainer.logger.log_dir)
    saved = json.loads((folder / "geometry" / "step_0000005.json").read_text())
    assert saved["step"] == 5 and list(saved["layers"]) == ["blocks.0.ffn"]
    (view,) = geometry.views
    with torch.no_grad():
        x = module.model.blocks[0].norm(module.model.input_proj(torch.cat(geometry.probe_inputs)))
    expected = probe(view, x[: CHEAP["max_tokens"]], geometry.probe_config).scalars("g")
    rows = read_metrics(tmp_path)
    assert sorted(logged(rows, SIGMA)) == [0, 4, 5]
    assert logged(rows, SIGMA)[5] == pytest.approx(expected["g/jac_sigma_max/mean"], rel=1e-9)
    assert float(trainer.callback_metrics[SIGMA]) == pytest.approx(logged(rows, SIGMA)[5], rel=1e-6)
    assert sorted(logged(rows, "curvature/hessian_trace")) == [0, 4, 5]
    # the report reads the final values at step 5, and says so
    runs = discover_runs([str(tmp_path)])
    table = results_table(seed_values(runs))
    assert table["final_step"].tolist() == [5]
    assert table["jac_sigma_max/mean:mean"].tolist() == pytest.approx([logged(rows, SIGMA)[5]])
    assert stale_final_values(runs) == []


def test_a_last_probe_far_from_the_end_is_warned_about_by_the_monitor_and_the_report(tmp_path):
    """A run cut to fewer steps than its probe interval, with the final probe off: only the initialisation."""
    geometry = GeometryMonitor(every_n_steps=8, at_fit_end=False, **CHEAP)
    trainer, _, warned = fit(tmp_path, [geometry], max_steps=5)
    assert geometry.probed_steps == [0]
    assert warned == [
        "GeometryMonitor: training ended at step 5, but the last values of 'blocks.0.ffn' (step 0) lie more than 10% "
        "of the run's steps before it (at_fit_end=False); the run's final values do not describe the trained model"
    ]
    runs = discover_runs([str(tmp_path)])
    assert results_table(seed_values(runs))["final_step"].tolist() == [0]
    # train/loss of the batch at step 4 is the last thing the log holds
    assert stale_final_values(runs) == [
        f"topk seed 0 ({runs[0].path}): its final values come from the initialisation (step 0), 4 steps before its "
        "last logged step (4), more than 10% of its steps; they do not describe the trained model"
    ]
    from moe_lightning.report import build_report

    with pytest.warns(UserWarning, match=r"moe-lightning report: topk seed 0 .*the initialisation \(step 0\)"):
        build_report([str(tmp_path)], str(tmp_path / "report"), formats=("md",))
    text = (tmp_path / "report" / "results.md").read_text()
    assert "Warning: topk seed 0" in text and "| final step |" in text


class NaNAtProbes(L.Callback):
    """Sets one weight of expert 1 to NaN after the batches of ``steps``, before the monitor probes that step, and
    puts it back afterwards (a second instance, after the monitor), so that training itself never sees it."""

    def __init__(self, steps: set[int], saved: dict | None = None) -> None:
        self.steps, self.saved = steps, saved if saved is not None else {}

    def restorer(self) -> NaNAtProbes:
        return NaNAtProbes(self.steps, self.saved)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step not in self.steps:
            return
        w_in = pl_module.model.blocks[0].ffn.w_in
        with torch.no_grad():
            if "w_in" in self.saved:
                w_in[1, 0, 0] = self.saved.pop("w_in")
            else:
                self.saved["w_in"] = w_in[1, 0, 0].clone()
                w_in[1, 0, 0] = float("nan")


def test_nan_weights_are_named_as_weights_with_the_step_once_until_they_recover(tmp_path):
    poison = NaNAtProbes({2, 3, 5})
    geometry = GeometryMonitor(every_n_steps=1, **CHEAP)
    _, module, warned = fit(tmp_path, [poison, geometry, poison.restorer()], max_steps=6)
    assert torch.isfinite(module.model.blocks[0].ffn.w_in).all()
    assert warned == [
        "GeometryMonitor: the weights of 'blocks.0.ffn' hold NaN/Inf at step 2 (w_in); no values of 'blocks.0.ffn' "
        "are logged until its weights are finite again",
        "GeometryMonitor: the weights of 'blocks.0.ffn' are finite again at step 4 (NaN/Inf since step 2); its "
        "values are logged again",
        "GeometryMonitor: the weights of 'blocks.0.ffn' hold NaN/Inf at step 5 (w_in); no values of 'blocks.0.ffn' "
        "are logged until its weights are finite again",
        "GeometryMonitor: the weights of 'blocks.0.ffn' are finite again at step 6 (NaN/Inf since step 5); its "
        "values are logged again",
    ]
    assert geometry.probed_steps == [0, 1, 2, 3, 4, 5, 6]
    rows = read_metrics(tmp_path)
    layer_keys = [k for k in rows[0] if k.startswith("geometry/blocks.0.ffn/")]
    assert {step for key in layer_keys for step in logged(rows, key)} == {0, 1, 4, 6}
    assert all(math.isfinite(v) for v in logged(rows, SIGMA).values())
    assert sorted(p.name for p in (Path(tmp_path) / "run").rglob("step_*.json")) == [
        f"step_{s:07d}.json" for s in (0, 1, 4, 6)
    ]


class NaNBeforeTheLayer(L.Callback):
    """The input projection, before the MoE layer, set to NaN when training ends (before the final probe)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.input_proj.weight.fill_(float("nan"))


def test_nan_inputs_from_the_model_before_a_layer_are_not_blamed_on_its_weights_or_the_probe_set(tmp_path):
    geometry = GeometryMonitor(every_n_steps=2, **CHEAP)
    _, _, warned = fit(tmp_path, [NaNBeforeTheLayer(), geometry], max_steps=3)
    assert warned == [
        "GeometryMonitor: 32 of 32 probe tokens reach 'blocks.0.ffn' with NaN/Inf inputs or gates at step 3 (the "
        "probe set is finite: the model before this layer made them); no values of 'blocks.0.ffn' are logged until "
        "its inputs are finite again",
        "GeometryMonitor: training ended at step 3, but the last values of 'blocks.0.ffn' (step 2) lie more than 10% "
        "of the run's steps before it (the probe at step 3 logged nothing for them); the run's final values do not "
        "describe the trained model",
    ]
    assert sorted(logged(read_metrics(tmp_path), SIGMA)) == [0, 2]


def test_nan_inputs_are_warned_about_once_until_they_end():
    incidents = LayerIncidents("GeometryMonitor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, dropped in ((1, 0), (2, 3), (3, 3), (4, 0), (5, 0)):
            incidents.inputs("ffn", step, dropped=dropped, kept=16 - dropped, probe_set_finite=True)
    assert [str(w.message) for w in caught] == [
        "GeometryMonitor: 3 of 16 probe tokens reach 'ffn' with NaN/Inf inputs or gates at step 2 (the probe set is "
        "finite: the model before this layer made them); they are left out and counted in "
        "geometry/<layer>/nonfinite_tokens",
        "GeometryMonitor: the probe tokens reach 'ffn' with finite inputs again at step 4 (NaN/Inf since step 2); "
        "every one of them is probed again",
    ]
