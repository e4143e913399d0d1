"""LoopMonitors in a loop of your own: a plain loop and an Accelerate loop log the same values and end in the weights
they end in without the monitors; with micro-batches, a plain loop logs the steps and values ``GeometryMonitor``,
``RouterMonitor`` and ``CurvatureMonitor`` log in Lightning on the same model, data and steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import read_metrics
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.monitors import CurvatureProbe, GeometryProbe, LoopMonitors, RouterProbe
from moe_lightning.nn import MLPMoE, MLPMoEConfig

CONFIG = MLPMoEConfig(input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=4, top_k=2, num_blocks=1)
DATA = TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.randn(32, 2))
GEOMETRY = dict(every_n_steps=1, max_tokens=8, layer_jacobian=False, subspace_rank=2)
CURVATURE = dict(
    every_n_steps=1, eigen_max_iter=8, trace_max_samples=4, density=False, param_groups={"router": "*router*"}
)
LR = 0.05
Logged = dict[int, dict[str, float]]


def new_model() -> MLPMoE:
    torch.manual_seed(0)
    return MLPMoE(CONFIG)


def mse(model: MLPMoE, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).output, y)


def monitors(model, loader, monitored: bool, logged: Logged, optimizer=None) -> LoopMonitors:
    """The three probes logging into ``logged`` (``{step: values}``, each key once per step), or none; the curvature
    of the first batch, with ``optimizer``'s stability threshold."""

    def log(values: dict[str, float], step: int) -> None:
        assert not logged.get(step, {}).keys() & values.keys(), f"logged twice at step {step}"
        logged.setdefault(step, {}).update(values)

    if not monitored:
        return LoopMonitors(model, next(iter(loader)), log)
    probes = GeometryProbe(**GEOMETRY), RouterProbe(every_n_steps=1)
    curvature = CurvatureProbe(**CURVATURE, loss_fn=mse)
    return LoopMonitors(model, next(iter(loader)), log, *probes, curvature=curvature, optimizer=optimizer)


def plain_loop(model: MLPMoE, monitored: bool = True, accumulate: int = 1) -> Logged:
    """One epoch of batches of 8, ``accumulate`` micro-batches per SGD step; ``{step: values}`` logged."""
    optimizer, loader, logged = torch.optim.SGD(model.parameters(), lr=LR), DataLoader(DATA, batch_size=8), {}
    with monitors(model, loader, monitored, logged, optimizer) as loop:
        for i, (x, y) in enumerate(loader):
            stepped = (i + 1) % accumulate == 0
            with loop.step(stepped=stepped):
                (torch.nn.functional.mse_loss(model(x).output, y) / accumulate).backward()
                if stepped:
                    optimizer.step()
                    optimizer.zero_grad()
    return logged


def accelerate_loop(model: MLPMoE) -> Logged:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(DATA, batch_size=8))
    logged: Logged = {}
    try:
        with monitors(wrapped, loader, True, logged, optimizer) as loop:  # Accelerate's wrapper of the SGD
            for x, y in loader:
                with accelerator.accumulate(wrapped), loop.step(stepped=accelerator.sync_gradients):
                    accelerator.backward(torch.nn.functional.mse_loss(wrapped(x).output, y))
                    optimizer.step()
                    optimizer.zero_grad()
    finally:  # Accelerate keeps its state in process-wide singletons
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return logged


def assert_same_values(ours: Logged, theirs: Logged, rel: float = 1e-6) -> None:
    assert sorted(ours) == sorted(theirs)
    for step in theirs:
        assert sorted(ours[step]) == sorted(theirs[step]), step
        for key, value in theirs[step].items():
            assert ours[step][key] == pytest.approx(value, rel=rel, abs=1e-7), (step, key)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_plain_loop_and_an_accelerate_loop_log_the_same_values_and_train_alike():
    pytest.importorskip("accelerate", reason="the Accelerate loop needs accelerate: pip install -e .[hf]")
    plain, accelerated, unobserved = new_model(), new_model(), new_model()
    ours, theirs = plain_loop(plain), accelerate_loop(accelerated)
    plain_loop(unobserved, monitored=False)
    assert sorted(ours) == [0, 1, 2, 3, 4]
    assert "geometry/blocks.0.ffn/jac_sigma_max/mean" in ours[4] and "router/blocks.0.ffn/entropy" in ours[3]
    assert "curvature/router/hessian_trace" in ours[0] and ours[4]["curvature/sgd_stability_threshold"] == 2 / LR
    assert_same_values(ours, theirs)
    assert_same_weights(plain, unobserved)
    assert_same_weights(accelerated, unobserved)


class Regression(L.LightningModule):
    def __init__(self, model: MLPMoE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x).output, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def lightning_values(model: MLPMoE, tmp_path, accumulate: int) -> Logged:
    """``{step: values}`` of the Lightning monitors on the same training (the probe set and the curvature's batch:
    the first training batch)."""
    callbacks = [
        GeometryMonitor(**GEOMETRY, save_reports=False),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(**CURVATURE, loss_fn=lambda module, batch: mse(module.model, batch), save_reports=False),
    ]
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(tmp_path),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(model), DataLoader(DATA, batch_size=8))
    found: Logged = {}
    for row in read_metrics(tmp_path):
        keys = {
            k: float(v)
            for k, v in row.items()
            if k.startswith(("geometry/", "router/", "curvature/")) and v not in ("", None)
        }
        if keys:
            found.setdefault(int(row["step"]), {}).update(keys)
    return found


def test_micro_batches_in_a_plain_loop_log_what_lightning_logs(tmp_path):
    ours_model, lightning_model = new_model(), new_model()
    ours, theirs = plain_loop(ours_model, accumulate=2), lightning_values(lightning_model, tmp_path, accumulate=2)
    # two steps of two micro-batches: the baseline, a router window per step (both micro-batches), a probe per step
    assert sorted(ours) == [0, 1, 2]
    assert all("curvature/hessian_top_eigenvalue" in ours[step] for step in (0, 1, 2))
    assert_same_values(ours, theirs, rel=1e-5)
    for (name, p), q in zip(ours_model.named_parameters(), lightning_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
