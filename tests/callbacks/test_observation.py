"""Observation only: training with the three monitors (a probe every 2-3 steps) ends in exactly the weights of the
run without them, in every precision, compile mode and strategy; a monitor's failure never stops training; a layer
that keeps state in its forward pass gets its state back; the values feed ModelCheckpoint and EarlyStopping; the
router window is whole across accumulation, resumption and the end of training; every key shares self.log's step
axis."""

import json
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import logged, read_metrics, run_test_script
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.nn.layer import MoEConfig, MoELayer

# Every test here trains, several of them twice, two on 2 gloo processes: integration tests (docs/testing.md).
pytestmark = pytest.mark.integration

STEPS = 6


class Net(nn.Module):
    """A small network around one MoE layer, as a user's own model."""

    def __init__(self, ffn: nn.Module | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.ffn = ffn or MoELayer(MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=2, jitter_noise=0.2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.ffn(h)[0])


class PlainMoE(L.LightningModule):
    """A user's own LightningModule (``self.model`` may be compiled inside it)."""

    def __init__(self, ffn: nn.Module | None = None, compile_model: bool = False, log: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        # Lightning 2.6 cannot trace its own self.log when the whole LightningModule is compiled
        self.log_loss = log
        self.model = Net(ffn)
        if compile_model:
            self.model = torch.compile(self.model, backend="aot_eager")

    def forward(self, x):
        return self.model(x)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.log_loss:
            self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 96, batch_size: int = 16):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=gen), torch.randn(n, 4, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def datamodule() -> L.LightningDataModule:
    """Training batches, and float32 validation data that GeometryMonitor draws its probe set from (the trainer
    converts a training batch to the model's precision; a probe set it never sees must be converted alike)."""
    gen = torch.Generator().manual_seed(1)
    val = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen))
    return L.LightningDataModule.from_datasets(loader().dataset, val, batch_size=16)


def monitors(**geometry) -> list:
    return [
        GeometryMonitor(every_n_steps=2, max_tokens=32, **geometry),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(every_n_steps=3, eigen_max_iter=3, trace_max_samples=2, density=False),
    ]


def fit(module, callbacks, tmp_path=None, max_steps=STEPS, ckpt_path=None, data=None, **options):
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path) if tmp_path else False,
        log_every_n_steps=1,
        enable_checkpointing=bool(options.pop("enable_checkpointing", False)),
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
    trainer.fit(module, data or loader(), ckpt_path=ckpt_path)
    return trainer


def weights(module) -> dict[str, torch.Tensor]:
    return {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_with_the_probe_above_the_matrix_free_threshold_ends_in_the_same_weights():
    """The real-width path inside training: a SwiGLU layer (H = 6 < D = 16) probed above the threshold takes the
    factored cores reduced by a QR, the mean Jacobians' reduced SVDs and the pages handed back after each step;
    training ends in the weights of the run without the monitors."""

    def run(callbacks):
        torch.manual_seed(0)
        ffn = MoELayer(
            MoEConfig(dim=16, expert_hidden=6, num_experts=4, top_k=2, activation="swiglu", jitter_noise=0.2)
        )
        module = PlainMoE(ffn)
        trainer = fit(module, callbacks, data=datamodule(), limit_val_batches=0)
        assert trainer.global_step == STEPS
        return weights(module)

    plain = run([])
    callbacks = monitors(probe_config={"matrix_free_threshold": 8})
    assert_same_weights(plain, run(callbacks))
    geometry = callbacks[0]
    assert geometry.probed_steps == [0, 2, 4, 6]
    report = geometry.last_reports["ffn"]
    assert report.variants["jac_source"] == "exact_factored_core" and "subspace_fun_overlap" in report.layer


@pytest.mark.parametrize(
    "setup", ["32-true", "bf16-mixed", "bf16-true", "16-true", "compiled module", "compiled model"]
)
def test_training_ends_in_the_same_weights_with_and_without_the_monitors(setup):
    precision = setup if setup[0].isdigit() or setup.startswith("bf16") else "32-true"

    def run(callbacks):
        module = PlainMoE(compile_model=setup == "compiled model", log=setup != "compiled module")
        target = torch.compile(module, backend="aot_eager") if setup == "compiled module" else module
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = fit(target, callbacks, precision=precision, data=datamodule(), limit_val_batches=0)
        assert trainer.global_step == STEPS
        ours = [str(w.message) for w in caught if "Monitor" in str(w.message)]
        return weights(module), ours

    plain, _ = run([])
    callbacks = monitors()
    observed, warned = run(callbacks)
    assert_same_weights(plain, observed)
    geometry, router, curvature = callbacks
    # the monitors did their work: every probe ran, under the names of the uncompiled model
    assert geometry.probed_steps == [0, 2, 4, 6] and sorted(geometry.last_reports) == ["ffn"], warned
    assert router.last_metrics and all(
        k.startswith(("router/ffn/", "router/mean/", "router/layers/")) for k in router.last_metrics
    )
    assert curvature.computed_steps == [0, 3, 6]
    if not setup.endswith("16-true"):  # half-precision Hessian products may be too coarse, and it says so
        assert curvature.last and not warned, warned
    # half precision: the probe reads float64 copies of the half-precision weights, from half-precision inputs
    assert geometry.last_reports["ffn"].scalars("g")["g/jac_sigma_max/mean"] > 0


def test_ddp_ranks_stay_in_sync_and_a_failing_rank_stops_nothing(tmp_path):
    out = tmp_path / "ddp.json"
    run_test_script("observation.py", out, tmp_path, ["ddp"])
    runs = json.loads(out.read_text())
    plain = runs["plain"]["weights"][0]
    assert runs["plain"]["weights"][1] == plain
    observed = runs["observed"]
    assert observed["weights"] == [plain, plain] and observed["warnings"] == []
    in_step = observed["logged"].pop("geometry_values")
    assert observed["logged"] == {"geometry": ["blocks.0.ffn"], "router": observed["logged"]["router"], "weights": 2}
    # the geometry probes computed beside training, in a child of each rank, summed over the ranks when both are
    # done: the same weights, and the values of the probes in the step at the same steps
    matrix_free = runs["observed_matrix_free"]
    assert matrix_free["weights"] == [plain, plain] and matrix_free["warnings"] == [], matrix_free["warnings"]
    assert sorted(matrix_free["logged"]["geometry_values"], key=int) == ["0", "2", "4", "6"]
    beside = runs["observed_background"]
    assert beside["weights"] == [plain, plain] and beside["warnings"] == []
    found = beside["logged"]["geometry_values"]
    assert sorted(found, key=int) == sorted(in_step, key=int) == ["0", "2", "4", "6"]
    for step, values in in_step.items():
        assert found[step].keys() == values.keys() and len(values) > 50
        for key, value in values.items():
            assert found[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (step, key)
    assert observed["logged"]["router"] > 0  # the weight spectra: α of both expert matrices (w_in, w_out)
    # a failure on rank 1 in every probe (or at setup) of every monitor: both ranks finish with the same weights,
    # and rank 0 gives one warning per monitor naming rank 1 and its error
    for fault, error in (("probe", "injected {} failure"), ("setup", "injected setup failure")):
        run = runs[fault]
        assert run["weights"] == [plain, plain], fault
        failed = [m for m in run["warnings"] if "training ended at step" not in m]
        assert len(failed) == 3, run["warnings"]
        for owner, kind in zip(
            ("GeometryMonitor", "CurvatureMonitor", "RouterMonitor"), ("probe", "curvature", "router")
        ):
            (message,) = [m for m in failed if m.startswith(owner)]
            assert f"on rank 1: RuntimeError('{error.format(kind)}')" in message and "Training goes on" in message
        # a monitor that failed at every probe says at the end that the run holds none of its values; one turned off
        # at setup has already said all there is to say
        ended = [m.split(" (")[0] for m in run["warnings"] if "training ended at step" in m]
        assert ended == (
            [
                "GeometryMonitor: training ended at step 6, but no values of 'blocks.0.ffn' were logged at all",
                "CurvatureMonitor: training ended at step 6, but no values of 'curvature' were logged at all",
            ]
            if fault == "probe"
            else []
        ), run["warnings"]
    # The check catches the old fault: a probe that swaps a parameter's dtype through .data replaces the node on
    # which DDP hangs its all-reduce, and the ranks silently stop averaging the MoE weights.
    legacy = runs["legacy_cast"]["weights"]
    assert legacy[0] != legacy[1]


def test_expert_parallel_and_fsdp2_training_end_in_the_same_weights(tmp_path):
    out = tmp_path / "mp.json"
    run_test_script("observation.py", out, tmp_path, ["model_parallel"])
    runs = json.loads(out.read_text())
    for preset in ("ep_cpu", "fsdp"):
        plain, observed = runs[f"{preset}/plain"], runs[f"{preset}/observed"]
        assert plain["weights"][0] == plain["weights"][1]
        assert observed["weights"] == plain["weights"], preset
        assert observed["logged"]["geometry"] == ["blocks.0.ffn", "blocks.1.ffn"] and observed["logged"]["router"]
        assert observed["logged"]["weights"] > 0
        # CurvatureMonitor does not serve FSDP2: it says so once and turns itself off; GeometryMonitor, asked to
        # probe beside training, says once why it probes in the step (its probe of a sharded layer is a collective)
        curvature, geometry = sorted(observed["warnings"])
        assert curvature.startswith("CurvatureMonitor: setting up failed") and "ModelParallelStrategy" in curvature
        assert geometry.startswith("GeometryMonitor: background=True: the layers are sharded over ranks")


class CountingMoE(MoELayer):
    """torchtitan's pattern: every forward (training or not) adds its tokens per expert to a buffer, and each
    optimiser step moves the aux-free expert bias by those counts, then clears them."""

    def __init__(self) -> None:
        super().__init__(
            MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=2, load_balancing="aux_free", bias_update_rate=0.1)
        )
        self.register_buffer("tokens_per_expert", torch.zeros(4))

    def forward(self, x):
        out, aux = super().forward(x)
        with torch.no_grad():
            self.tokens_per_expert += aux.tokens_per_expert.float()
        return out, aux

    @torch.no_grad()
    def step_bias(self) -> None:
        counts = self.tokens_per_expert
        self.router.expert_bias += 0.1 * (counts.mean() - counts) / counts.mean()
        counts.zero_()


class CountingModule(PlainMoE):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(ffn=CountingMoE())

    def on_before_optimizer_step(self, optimizer) -> None:
        self.model.ffn.step_bias()


def test_a_layer_that_counts_tokens_in_its_forward_trains_alike():
    plain = CountingModule()
    fit(plain, [])
    observed = CountingModule()
    fit(observed, monitors())
    assert_same_weights(weights(plain), weights(observed))
    assert not torch.equal(plain.model.ffn.router.expert_bias, torch.zeros(4))  # the bias did move


class Remembering(MoELayer):
    """A layer that keeps a record of its forward passes outside its buffers (as a list and a counter)."""

    def __init__(self) -> None:
        super().__init__(MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=2))
        self.history: list[float] = []
        self.calls = 0

    def forward(self, x):
        self.history.append(float(x.detach().abs().mean()))
        self.calls += 1
        return super().forward(x)


def test_state_a_forward_keeps_outside_buffers_is_named_and_set_back_where_it_can_be():
    torch.manual_seed(0)
    module = PlainMoE(ffn=Remembering())
    monitor = GeometryMonitor(every_n_steps=None, max_tokens=16)
    with pytest.warns(UserWarning, match="GeometryMonitor: the model's forward pass changes state") as caught:
        fit(module, [monitor], max_steps=2)
    (message,) = [str(w.message) for w in caught if "changes state" in str(w.message)]
    assert "model.ffn.calls" in message and "model.ffn.history" in message
    assert "set back: model.ffn.calls" in message and "not restored: model.ffn.history" in message
    assert module.model.ffn.calls == 2  # the two training steps; the probe's pass was set back


class Counting(MoELayer):
    """A layer that counts its forward passes in a plain attribute, which a probe's pass gives a new value."""

    def __init__(self) -> None:
        super().__init__(MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=2))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_state_set_back_whole_trains_alike_without_a_warning():
    torch.manual_seed(0)
    module = PlainMoE(ffn=Counting())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [GeometryMonitor(every_n_steps=None, max_tokens=16)], max_steps=2)
    assert not [w for w in caught if "changes state" in str(w.message)]
    assert module.model.ffn.calls == 2  # the two training steps; the probe's passes were set back


def test_model_checkpoint_and_early_stopping_use_geometry_and_router_keys(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="geometry/ffn/jac_sigma_max/mean", mode="min", every_n_train_steps=2
    )
    # stop at the second epoch end: its load CV cannot beat the first epoch's by 1e6
    stop = EarlyStopping(
        monitor="router/mean/load_cv", mode="max", min_delta=1e6, patience=0, check_on_train_epoch_end=True
    )
    geometry, router = GeometryMonitor(every_n_steps=2, max_tokens=32), RouterMonitor(log_every_n_steps=1)
    trainer = fit(PlainMoE(), [geometry, router, checkpoint, stop], tmp_path, max_steps=20, enable_checkpointing=True)
    rows = read_metrics(tmp_path)
    sigma = logged(rows, "geometry/ffn/jac_sigma_max/mean")
    checked = {s: v for s, v in sigma.items() if s > 0}  # ModelCheckpoint's steps: 2, 4, ..., 12
    best_step = min(checked, key=checked.get)
    assert float(checkpoint.best_model_score) == pytest.approx(checked[best_step], rel=1e-6)
    assert checkpoint.best_model_path.endswith(f"step={best_step}.ckpt")
    # two epochs of 6 batches, then EarlyStopping stopped, holding the router key of the first epoch's end
    assert trainer.global_step == 12 and stop.stopped_epoch == 1
    assert float(stop.best_score) == pytest.approx(logged(rows, "router/mean/load_cv")[5], rel=1e-6)


def router_module() -> PlainMoE:
    torch.manual_seed(0)
    return PlainMoE(ffn=MoELayer(MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=2)))


def test_router_window_survives_a_resume_and_the_last_window_is_logged(tmp_path):
    # windows at steps 0 and 4, then the last one (steps 5-7) when training ends at step 8
    fit(router_module(), [RouterMonitor(log_every_n_steps=4)], tmp_path / "whole", max_steps=8)
    whole = logged(read_metrics(tmp_path / "whole"), "router/ffn/load_cv")
    assert sorted(whole) == [0, 4, 7]
    # the same run cut after 6 steps (one epoch) and resumed from the checkpoint written then
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    fit(router_module(), [RouterMonitor(log_every_n_steps=4), save], tmp_path / "first", enable_checkpointing=True)
    resumed = router_module()
    fit(
        resumed,
        [RouterMonitor(log_every_n_steps=4)],
        tmp_path / "second",
        max_steps=8,
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"),
    )
    second = logged(read_metrics(tmp_path / "second"), "router/ffn/load_cv")
    assert sorted(second) == [7] and second[7] == pytest.approx(whole[7], rel=1e-12)


def test_an_accumulated_step_counts_every_micro_batch():
    monitor = RouterMonitor(log_every_n_steps=1, max_expert_keys=None)
    module = router_module()
    layer = module.model.ffn
    # the reference: the top-2 loads of the first 4 batches (one optimiser step) at the initial weights
    with torch.no_grad():
        x = torch.cat([batch[0] for batch, _ in zip(loader(), range(4), strict=False)])
        index = layer.router(module.model.inp(x)).expert_index
    counts = torch.bincount(index.reshape(-1), minlength=4).double()
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[monitor],
        logger=False,
        accumulate_grad_batches=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader())
    loads = [monitor.last_metrics[f"router/ffn/load/e{i}"] for i in range(4)]
    assert loads == pytest.approx((counts / counts.sum()).tolist(), rel=1e-12)


class TwoOptimisers(PlainMoE):
    """Manual optimisation with two optimisers (as a GAN steps its two networks): global_step counts both."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        for optimizer in (first, second):
            loss = self.loss(batch)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train/loss", loss)

    def configure_optimizers(self):
        body = [p for n, p in self.named_parameters() if not n.startswith("model.head")]
        return torch.optim.SGD(body, lr=0.1), torch.optim.SGD(self.model.head.parameters(), lr=0.1)


def test_every_key_shares_self_logs_step_axis_under_manual_optimisation(tmp_path):
    geometry = GeometryMonitor(every_n_steps=2, max_tokens=32)
    trainer = fit(TwoOptimisers(), [geometry, RouterMonitor(log_every_n_steps=2)], tmp_path, max_steps=8)
    assert trainer.global_step == 8  # four batches, two optimiser steps each
    rows = read_metrics(tmp_path)
    assert sorted(logged(rows, "train/loss")) == [0, 1, 2, 3]  # Lightning's own axis: batches
    assert sorted(logged(rows, "geometry/ffn/jac_sigma_max/mean")) == [0, 2, 4] == geometry.probed_steps
    assert sorted(logged(rows, "router/ffn/load_cv")) == [0, 2, 3]  # windows, and the last one at the end
