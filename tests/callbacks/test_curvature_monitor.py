"""CurvatureMonitor with Lanczos, Hutch++ and the SLQ density (docs/geometry.md §7) against the exact Hessian of a
tiny MLP-MoE (numpy ``eigvalsh``), per parameter group, as W&B/TensorBoard/JSON densities, under NaN, and under
2-process gloo DDP against one process.

Shape legend: ``P`` parameters, ``G`` density grid points.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import logged, read_metrics, run_test_script
from lightning.pytorch.loggers import TensorBoardLogger
from test_router_curvature_monitors import Data, exact_hessian, tiny_curvature_module, trainer

from moe_lightning.callbacks import CurvatureMonitor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference():
    """A fresh module per call (the same initial weights), the data, and the exact Hessian at those weights."""
    data = Data(n=32, batch_size=32)
    H = exact_hessian(tiny_curvature_module("soft"), (data.x, data.y))
    return (lambda: tiny_curvature_module("soft")), data, (H + H.T) / 2


@pytest.mark.integration  # fits against the exact Hessian
def test_lanczos_monitor_matches_exact_hessian_whole_and_per_group(tmp_path, reference):
    make, data, H = reference
    module = make()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in module.parameters() if p.requires_grad]
    offsets = np.cumsum([0] + sizes)
    router = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if fnmatch.fnmatchcase(n, "*router*")]
    )
    monitor = CurvatureMonitor(
        every_n_steps=100, top_k=2, trace_method="hutchpp", param_groups={"router": "*router*"}, seed=1
    )
    trainer(tmp_path, [monitor], max_steps=1).fit(module, data)
    rows = read_metrics(tmp_path)
    for prefix, block in (("curvature", H), ("curvature/router", H[np.ix_(router, router)])):
        exact = np.linalg.eigvalsh(block)
        for i in range(2):
            assert logged(rows, f"{prefix}/hessian_eigenvalue/{i}")[0] == pytest.approx(exact[-1 - i], rel=1e-3)
            residual = logged(rows, f"{prefix}/hessian_eigenvalue_residual/{i}")[0]
            assert residual <= 1e-3 * abs(exact[-1 - i]) * 1.001  # the default residual tolerance was met
        assert logged(rows, f"{prefix}/hessian_lambda_min")[0] == pytest.approx(exact[0], rel=1e-3, abs=1e-6)
        assert logged(rows, f"{prefix}/hessian_top_converged")[0] == 1.0
        trace, err = logged(rows, f"{prefix}/hessian_trace")[0], logged(rows, f"{prefix}/hessian_trace_std_error")[0]
        assert abs(trace - np.trace(block)) < 4 * err + 1e-6 * abs(np.trace(block))
        assert logged(rows, f"{prefix}/hessian_trace_samples")[0] == 30  # Hutch++ spends its whole budget
    assert len(router) < H.shape[0]


@pytest.mark.integration  # a fit with the density and TensorBoard
def test_density_is_saved_logged_to_tensorboard_and_integrates_to_one(tmp_path, reference):
    make, data, H = reference
    module = make()
    monitor = CurvatureMonitor(every_n_steps=2, eigenvalue=False, density_starts=3, density_steps=20)
    logger = TensorBoardLogger(tmp_path, name="tb")
    L.Trainer(
        max_steps=2,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, data)
    assert monitor.computed_steps == [0, 2]
    files = sorted(os.listdir(Path(logger.log_dir) / "curvature"))
    assert files == ["step_0000000.json", "step_0000002.json"]
    saved = json.loads((Path(logger.log_dir) / "curvature" / files[0]).read_text())["densities"]["curvature"]
    grid, phi = np.array(saved["grid"]), np.array(saved["density"])
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    # quadrature moments at step 0 match the exact (1/P) tr H and (1/P) tr H² within 5 standard errors of 3 starts
    nodes, weights = np.array(saved["nodes"]), np.array(saved["weights"])
    P = H.shape[0]
    assert saved["dim"] == P
    m2 = P * (weights * nodes**2).sum(-1)
    assert abs(m2.mean() - np.trace(H @ H)) < 5 * m2.std(ddof=1) / math.sqrt(3) + 1e-9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    hist = events.Histograms("curvature/hessian_density")
    assert [h.step for h in hist] == [0, 2]
    assert sum(hist[0].histogram_value.bucket) == pytest.approx(P, rel=1e-2)


def test_the_dominant_eigenvalue_is_logged_and_bad_options_are_reported(tmp_path, reference):
    make, data, H = reference
    module = make()
    monitor = CurvatureMonitor(trace_method="hutchinson", density=False, eigen_max_iter=300, eigen_tol=1e-7)
    fitted = trainer(tmp_path, [monitor], max_steps=1)
    fitted.fit(module, data)
    eig = np.linalg.eigvalsh(H)
    # H is the Hessian at the initial weights: the fit-start value; the end of training is computed too
    top = logged(read_metrics(tmp_path), "curvature/hessian_top_eigenvalue")
    assert sorted(top) == [0, 1] == monitor.computed_steps
    assert top[0] == pytest.approx(eig[np.abs(eig).argmax()], rel=1e-3)
    # AdamW: no preconditioned sharpness before its first step (no state), then the value and the threshold of
    # the optimiser as it stands after that step
    rows = read_metrics(tmp_path)
    assert logged(rows, "curvature/preconditioned_top_eigenvalue").keys() == {1}
    (group,) = fitted.optimizers[0].param_groups
    threshold = logged(rows, "curvature/adam_stability_threshold")
    assert threshold[1] == pytest.approx((2 + 2 * group["betas"][0]) / ((1 - group["betas"][0]) * group["lr"]))
    assert not logged(rows, "curvature/sgd_stability_threshold")
    with pytest.raises(ValueError, match="method"):
        CurvatureMonitor(method="arnoldi")
    # Lanczos is the one eigenvalue method; the error names it
    with pytest.raises(ValueError, match="method='power' is not supported; allowed values: 'lanczos'"):
        CurvatureMonitor(method="power")
    with pytest.raises(ValueError, match="trace_method"):
        CurvatureMonitor(trace_method="xtrace")
    with pytest.raises(ValueError, match="top_k"):
        CurvatureMonitor(top_k=0)
    with pytest.raises(ValueError, match="param_groups"):
        CurvatureMonitor(full_model=False)
    # a group that matches nothing turns the monitor off at setup, with one warning; training goes on
    nothing = CurvatureMonitor(param_groups={"nothing": "zzz*"})
    run = trainer(tmp_path / "bad", [nothing], max_steps=1)
    with pytest.warns(UserWarning, match=r"param_groups\['nothing'\].*matches no trainable parameter"):
        run.fit(tiny_curvature_module("soft"), data)
    assert nothing.disabled and run.global_step == 1 and nothing.computed_steps == []


def test_nan_loss_warns_and_training_finishes(tmp_path):
    module = tiny_curvature_module("soft")

    def nan_loss(pl_module, batch):
        return pl_module.loss(batch)[0] * float("nan")

    fit = trainer(tmp_path, [CurvatureMonitor(every_n_steps=2, loss_fn=nan_loss)], max_steps=3)
    with pytest.warns(UserWarning, match="CurvatureMonitor: curvature"):
        fit.fit(module, Data(n=32, batch_size=16))
    assert fit.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # values that cannot be trusted are left out rather than logged as NaN
    rows = read_metrics(tmp_path)
    curvature = [float(r[k]) for r in rows for k in r if k.startswith("curvature/") and r[k] not in (None, "")]
    assert all(math.isfinite(v) for v in curvature), curvature


@pytest.mark.integration  # two gloo processes
def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    run_test_script("ddp_curvature.py", out, tmp_path)
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["steps"] == [0, 1]  # fit start and the end of training
    assert data["shard_rows"] == [16, 16] and data["shards_differ"]  # each rank probed its own shard
    for ddp, single in ((data["ddp_first"], data["single_first"]), (data["ddp"], data["single"])):
        assert ddp.keys() == single.keys() and "curvature/router/hessian_trace" in ddp and len(ddp) > 20
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
    assert "curvature/router/preconditioned_top_eigenvalue" in data["ddp"]
    assert data["ddp_first"] != data["ddp"]  # one training step apart
    np.testing.assert_allclose(data["ddp_density"], data["single_density"], rtol=1e-9, atol=1e-12)
