"""RouterMonitor and CurvatureMonitor against independent references (numpy, exact autograd Hessians), and the
robustness of GeometryMonitor (a failing probe, NaN probe tokens): training always finishes.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``P`` parameters.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import logged, numpy_health, read_metrics
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.geometry import router_statistics
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig


def trainer(tmp_path: Path, callbacks: list, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(tmp_path),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **{"log_every_n_steps": 1, **kwargs},
    )


class Data(L.LightningDataModule):
    """Fixed random regression data; ``val_x`` may hold NaN rows (the probe set comes from validation data)."""

    def __init__(self, n: int = 64, input_dim: int = 4, output_dim: int = 2, batch_size: int = 16, val_x=None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, input_dim, generator=gen)
        self.y = torch.randn(n, output_dim, generator=gen)
        self.val_x = val_x
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self):
        if self.val_x is None:
            return []
        return DataLoader(TensorDataset(self.val_x, torch.zeros(len(self.val_x), self.y.shape[1])), batch_size=16)


# ---------------------------------------------------------------------------------------------- router_statistics
def numpy_router_statistics(gates_NE: np.ndarray, probs_NE: np.ndarray) -> dict[str, object]:
    """docs/geometry.md §6 by hand: loads from routed counts (or gate mass when every gate is positive)."""
    load = gates_NE.sum(0) if (gates_NE > 0).all() else (gates_NE > 0).sum(0).astype(float)
    share = load / load.sum()
    p = probs_NE / probs_NE.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    top = np.sort(p, axis=-1)[:, ::-1]
    return {
        "load": share,
        "load_cv": share.std() / share.mean(),
        "load_max_over_mean": share.max() / share.mean(),
        "entropy": -plogp.sum(-1).mean(),
        "margin": (top[:, 0] - top[:, 1]).mean(),
    }


def assert_stats_match(stats: dict, expected: dict) -> None:
    np.testing.assert_allclose(stats["load"].numpy(), expected["load"], rtol=1e-12, atol=1e-12)
    for key in ("load_cv", "load_max_over_mean", "entropy", "margin"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-12), key


def test_router_statistics_topk_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, top2, np.take_along_axis(probs, top2, -1), -1)
    gates /= gates.sum(-1, keepdims=True)
    stats = router_statistics(torch.tensor(gates), torch.tensor(probs))
    assert_stats_match(stats, numpy_router_statistics(gates, probs))
    # top-2 load counts assignments: every token is counted twice, shares sum to 1
    np.testing.assert_allclose(stats["load"].numpy(), (gates > 0).sum(0) / 100)


def test_router_statistics_soft_uses_gate_mass():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    stats = router_statistics(torch.tensor(probs))  # soft routing: gates are the probabilities
    expected = numpy_router_statistics(probs, probs)
    assert_stats_match(stats, expected)
    np.testing.assert_allclose(stats["load"].numpy(), probs.mean(0), rtol=1e-12)


def test_router_statistics_one_dominant_expert():
    # Every token sent (top-1) to expert 0: loads (1, 0, 0, 0), CV sqrt(E - 1), max/mean E, margin 0.7 - 0.1.
    E = 4
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (10, 1))
    gates = np.zeros_like(probs)
    gates[:, 0] = 1.0
    stats = router_statistics(torch.tensor(gates), torch.tensor(probs))
    np.testing.assert_allclose(stats["load"].numpy(), [1.0, 0, 0, 0])
    assert stats["load_cv"] == pytest.approx(math.sqrt(E - 1))
    assert stats["load_max_over_mean"] == pytest.approx(E)
    assert stats["margin"] == pytest.approx(0.6)
    assert stats["entropy"] == pytest.approx(-(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)))
    # without probabilities the normalised gates stand in: one-hot, entropy 0, margin 1
    stats = router_statistics(torch.tensor(gates))
    assert stats["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert stats["margin"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- RouterMonitor
class Snapshot(Callback):
    """Keeps the batch and a copy of the weights at the start of every training batch, keyed by global step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step] = (copy.deepcopy(batch), copy.deepcopy(pl_module.model.state_dict()))


def reference_block_routing(model_config: MLPMoEConfig, state: dict, x: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """Each block's logits, probabilities and top-k gates, recomputed with plain ops from saved weights (float64).

    The model's own blocks only carry the residual stream from one block to the next."""
    from moe_lightning.nn.models import MLPMoE

    model = MLPMoE(model_config).double()
    model.load_state_dict(state)
    k = model_config.top_k
    out = []
    with torch.no_grad():
        h = model.input_proj(x.double())
        for b, block in enumerate(model.blocks):
            n = torch.nn.functional.layer_norm(
                h, (h.shape[-1],), state[f"blocks.{b}.norm.weight"].double(), state[f"blocks.{b}.norm.bias"].double()
            )
            logits = (n @ state[f"blocks.{b}.ffn.router.weight"].double().T).numpy()  # (N, E)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
            gates = np.zeros_like(probs)
            np.put_along_axis(gates, chosen, np.take_along_axis(probs, chosen, -1), -1)
            gates /= gates.sum(-1, keepdims=True)
            out.append({"logits": logits, "probs": probs, "gates": gates})
            h, _ = block(h)
    return out


def reference_router_metrics(model_config: MLPMoEConfig, window: list[tuple[dict, torch.Tensor]]) -> dict[str, float]:
    """Router metrics of every block over a window of ``(weights, batch)`` pairs, numpy statistics of the union of
    the window's tokens (each routed by the weights of its own step); the aux losses are means over batches."""
    E, k, cf = model_config.num_experts, model_config.top_k, model_config.capacity_factor
    per_batch = [reference_block_routing(model_config, state, x) for state, x in window]
    out: dict[str, float] = {}
    for b in range(model_config.num_blocks):
        name = f"router/blocks.{b}.ffn"
        blocks = [batch[b] for batch in per_batch]
        gates = np.concatenate([r["gates"] for r in blocks])
        stats = numpy_router_statistics(gates, np.concatenate([r["probs"] for r in blocks]))
        for e in range(E):
            out[f"{name}/load/e{e}"] = stats["load"][e]
        for key in ("load_cv", "load_max_over_mean", "entropy", "margin"):
            out[f"{name}/{key}"] = stats[key]
        for key, value in numpy_health((gates > 0).sum(0).astype(float)).items():
            out[f"{name}/{key}"] = value
        dropped, lb, z = 0, [], []
        for r in blocks:
            counts = (r["gates"] > 0).sum(0)
            capacity = math.ceil(cf * len(r["gates"]) * k / E)  # GShard/Switch capacity
            dropped += np.maximum(counts - capacity, 0).sum()
            # Switch eq. 4-6 with f_i from the router's decisions; ST-MoE z-loss
            lb.append(E * (counts / counts.sum() * r["probs"].mean(0)).sum())
            logits = r["logits"]
            lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            z.append((lse**2).mean())
        out[f"{name}/dropped_fraction"] = dropped / (len(gates) * k)
        out[f"{name}/aux_load_balance"] = np.mean(lb)
        out[f"{name}/aux_z_loss"] = np.mean(z)
    for key in ("load_cv", "entropy", "margin", "dropped_fraction", "aux_load_balance", "diversity"):
        out[f"router/mean/{key}"] = np.mean(
            [out[f"router/blocks.{b}.ffn/{key}"] for b in range(model_config.num_blocks)]
        )
    return out


def test_router_monitor_logs_statistics_of_the_whole_window(tmp_path):
    L.seed_everything(0)
    config = MLPMoEConfig(
        routing="topk",
        input_dim=4,
        output_dim=2,
        dim=8,
        expert_hidden=8,
        num_experts=4,
        top_k=2,
        num_blocks=2,
        capacity_factor=0.75,
    )
    module = MLPMoEModule(config, lr=1e-2)
    snapshot = Snapshot()
    fit = trainer(tmp_path, [snapshot, RouterMonitor(log_every_n_steps=3)], max_steps=7)
    fit.fit(module, Data(n=64, batch_size=16))
    rows = read_metrics(tmp_path)
    steps = sorted(logged(rows, "router/blocks.0.ffn/load_cv"))
    assert steps == [0, 3, 6]  # global_step % 3 == 0, labelled with the step of the weights that routed
    dropped_seen = []
    for step, window in zip(steps, ([0], [1, 2, 3], [4, 5, 6]), strict=True):
        pairs = [(snapshot.at[s][1], snapshot.at[s][0][0]) for s in window]
        expected = reference_router_metrics(config, pairs)
        for key, value in expected.items():
            assert logged(rows, key)[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
        dropped_seen.append(expected["router/blocks.0.ffn/dropped_fraction"])
        # the last batch alone is not the window (window accumulation is what the reference checks)
        if len(window) > 1:
            alone = reference_router_metrics(config, pairs[-1:])
            assert any(alone[k] != pytest.approx(v, rel=1e-5) for k, v in expected.items() if "load" in k)
    assert max(dropped_seen) > 0  # capacity factor 0.75 really drops assignments here
    # the window of step 0 is its one batch: the aux loss the module logs for it agrees with the per-layer keys
    assert logged(rows, "train/aux_load_balance")[0] == pytest.approx(
        logged(rows, "router/mean/aux_load_balance")[0], rel=1e-5
    )


def test_router_monitor_rejects_bad_options():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        RouterMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="max_expert_keys"):
        RouterMonitor(max_expert_keys=-1)


# ---------------------------------------------------------------------------------------------- CurvatureMonitor
class LossOf(torch.nn.Module):
    """``module.loss(batch)[0]`` as a forward, so ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.loss(batch)[0]


def exact_hessian(module: MLPMoEModule, batch) -> np.ndarray:
    """The full ``(P, P)`` Hessian of the total loss in float64, by autograd over the flattened parameters."""
    module = copy.deepcopy(module).double().eval()
    wrapper = LossOf(module)
    names = [f"module.{n}" for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in module.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)

    def loss_of(flat_P):
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat_P[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return torch.func.functional_call(wrapper, params, (batch,))

    return torch.autograd.functional.hessian(loss_of, flat, vectorize=True).numpy()


def tiny_curvature_module(routing: str = "topk") -> MLPMoEModule:
    torch.manual_seed(0)
    config = MLPMoEConfig(
        routing=routing, input_dim=4, output_dim=2, dim=8, expert_hidden=4, num_experts=2, top_k=1, num_blocks=1
    )
    return MLPMoEModule(config, lr=1e-2)


# top-k double backward through the grouped dispatch is slower on CPU; the soft case covers the same path fast
@pytest.mark.integration  # a fit against the exact Hessian (test_curvature_monitor.py checks the monitor quickly)
@pytest.mark.parametrize("routing", [pytest.param("topk", marks=pytest.mark.slow), "soft"])
def test_curvature_monitor_matches_exact_hessian(tmp_path, routing):
    module = tiny_curvature_module(routing)
    assert sum(p.numel() for p in module.parameters()) < 400
    data = Data(n=32, batch_size=32)
    first_batch = (data.x, data.y)
    H = exact_hessian(module, first_batch)  # before training: the monitor's fit-start value uses these weights
    eigenvalues = np.linalg.eigvalsh((H + H.T) / 2)
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    monitor = CurvatureMonitor(
        every_n_steps=100, eigen_max_iter=300, eigen_tol=1e-7, trace_max_samples=60, trace_tol=0.0, seed=3
    )
    trainer(tmp_path, [monitor], max_steps=2).fit(module, data)
    rows = read_metrics(tmp_path)
    top = logged(rows, "curvature/hessian_top_eigenvalue")
    trace = logged(rows, "curvature/hessian_trace")
    std_error = logged(rows, "curvature/hessian_trace_std_error")
    assert set(top) == {0, 2} and monitor.computed_steps == [0, 2]  # fit start and the end of training
    assert top[0] == pytest.approx(dominant, rel=1e-3)
    assert abs(trace[0] - np.trace(H)) < 4 * std_error[0] + 1e-4
    assert logged(rows, "curvature/hessian_trace_samples")[0] == 60


def test_curvature_monitor_leaves_grads_params_and_mode_alone(tmp_path):
    module = tiny_curvature_module("soft")
    monitor = CurvatureMonitor(every_n_steps=100, eigen_max_iter=5, trace_max_samples=3)
    fit = trainer(tmp_path, [monitor], max_steps=1)
    fit.fit(module, Data(n=32, batch_size=32))
    params = [p for p in module.parameters()]
    sentinel = [torch.full_like(p, 0.5 + i) for i, p in enumerate(params)]
    for p, g in zip(params, sentinel, strict=True):
        p.grad = g.clone()
    params[0].grad = None  # a missing grad must stay missing
    before = [p.detach().clone() for p in params]
    module.train()
    rng = torch.get_rng_state()
    metrics = monitor.compute(fit, module)
    assert math.isfinite(metrics["curvature/hessian_top_eigenvalue"]) and metrics["curvature/hessian_trace"] != 0
    assert params[0].grad is None
    for p, g, b in zip(params[1:], sentinel[1:], before[1:], strict=True):
        assert torch.equal(p.grad, g)
        assert torch.equal(p.detach(), b)
    assert module.training and all(m.training for m in module.modules())
    assert torch.equal(torch.get_rng_state(), rng)


class NoLoss(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_curvature_monitor_without_loss_warns_clearly_and_training_goes_on(tmp_path):
    monitor = CurvatureMonitor()
    run = trainer(tmp_path, [monitor], max_steps=1)
    with pytest.warns(UserWarning, match="no loss\\(batch\\) method.*loss_fn"):
        run.fit(NoLoss(), Data())
    assert monitor.disabled and run.global_step == 1
    # with a loss_fn the same module works, and the value is the exact (constant) Hessian of a linear LS loss
    data = Data(n=32, batch_size=32)
    module = NoLoss()

    def loss_fn(pl_module, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(pl_module.layer(x), y)

    monitor = CurvatureMonitor(loss_fn=loss_fn, eigen_max_iter=500, eigen_tol=1e-10, trace=False)
    trainer(tmp_path / "ok", [monitor], max_steps=1).fit(module, data)
    # mse over (N, 2) outputs: H = (2 / (2N)) * kron(I_2, [X 1]^T [X 1]); top eigenvalue of that Gram matrix
    X1 = np.concatenate([data.x.numpy().astype(np.float64), np.ones((32, 1))], axis=1)
    expected = np.linalg.eigvalsh(X1.T @ X1 / 32).max()
    assert monitor.last["curvature/hessian_top_eigenvalue"] == pytest.approx(expected, rel=1e-4)


def test_curvature_monitor_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_steps"):
        CurvatureMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="eigenvalue or trace"):
        CurvatureMonitor(eigenvalue=False, trace=False)


# ---------------------------------------------------------------------------------------------- robustness
def geometry_module() -> MLPMoEModule:
    torch.manual_seed(0)
    config = MLPMoEConfig(
        routing="topk", input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=4, top_k=2, num_blocks=1
    )
    return MLPMoEModule(config, lr=1e-2)


def test_failing_probe_warns_and_training_finishes(tmp_path, monkeypatch):
    import moe_lightning.monitors.sharded as sharded

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(sharded, "probe_statistics", broken)
    module = geometry_module()
    fit = trainer(tmp_path, [GeometryMonitor(every_n_steps=2, max_tokens=16)], max_steps=4)
    with pytest.warns(UserWarning) as caught:
        fit.fit(module, Data())
    assert fit.global_step == 4
    # every probe of every layer failed: one warning says so, naming the first; at the end of training one more
    # says that the run holds no values of the layer
    ours = [str(w.message) for w in caught if str(w.message).startswith("GeometryMonitor")]
    assert len(ours) == 2, ours
    assert "the probe failed: RuntimeError('probe exploded'); no values of 'blocks.0.ffn'" in ours[0]
    assert ours[1] == (
        "GeometryMonitor: training ended at step 4, but no values of 'blocks.0.ffn' were logged at all (the probe at "
        "step 4 logged nothing for them); the run's final values do not describe the trained model"
    )
    rows = read_metrics(tmp_path)
    assert not any(k.startswith("geometry/") for k in rows[0])
    assert logged(rows, "train/loss")  # training logged as usual


def test_nan_probe_tokens_are_counted_and_training_finishes(tmp_path):
    val_x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    val_x[[1, 5, 6], 2] = float("nan")
    module = geometry_module()
    fit = trainer(tmp_path, [GeometryMonitor(every_n_steps=2, max_tokens=16, layer_jacobian=False)], max_steps=4)
    with pytest.warns(UserWarning, match="NaN/Inf") as caught:
        fit.fit(module, Data(val_x=val_x))
    assert fit.global_step == 4
    # named as the probe set's, once for the run (every probe drops the same tokens)
    assert [str(w.message) for w in caught if "probe tokens" in str(w.message)] == [
        "GeometryMonitor: 3 of 16 probe tokens reach 'blocks.0.ffn' with NaN/Inf inputs or gates at step 0 (the "
        "probe set itself holds NaN/Inf); they are left out and counted in geometry/<layer>/nonfinite_tokens"
    ]
    rows = read_metrics(tmp_path)
    nonfinite = logged(rows, "geometry/blocks.0.ffn/nonfinite_tokens")
    assert sorted(nonfinite) == [0, 2, 4]
    assert all(v == 3 for v in nonfinite.values())  # the 3 NaN rows among the first 16 probe tokens
    sigma = logged(rows, "geometry/blocks.0.ffn/jac_sigma_max/mean")
    assert sorted(sigma) == [0, 2, 4] and all(math.isfinite(v) and v > 0 for v in sigma.values())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_router_monitor_bias_range_and_change_of_aux_free_layers(tmp_path):
    class Biases(Callback):
        """The expert biases after each step's update, as RouterMonitor sees them when it logs."""

        def __init__(self) -> None:
            self.at: dict[int, list[torch.Tensor]] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.at[trainer.global_step - 1] = [b.ffn.router.expert_bias.clone() for b in pl_module.model.blocks]

    L.seed_everything(0)
    config = MLPMoEConfig(
        input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=4, top_k=1, num_blocks=2, scoring="sigmoid",
        load_balancing="aux_free", bias_update_rate=0.01,
    )  # fmt: skip
    biases = Biases()
    fit = trainer(tmp_path, [RouterMonitor(log_every_n_steps=3), biases], max_steps=7)
    fit.fit(MLPMoEModule(config, lr=1e-2), Data(n=64, batch_size=16))
    rows = read_metrics(tmp_path)
    previous = [torch.zeros(4), torch.zeros(4)]
    for step in (0, 3, 6):
        for b in range(2):
            bias = biases.at[step][b]
            assert logged(rows, f"router/blocks.{b}.ffn/bias_range")[step] == pytest.approx(
                float(bias.max() - bias.min())
            )
            change = float((bias - previous[b]).abs().max())
            assert logged(rows, f"router/blocks.{b}.ffn/bias_change")[step] == pytest.approx(change, abs=1e-7)
            previous[b] = bias
    assert logged(rows, "router/blocks.0.ffn/bias_change")[3] > 0
