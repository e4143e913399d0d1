"""The monitors in the Hugging Face ``Trainer``: a tiny random Qwen3-MoE trained for two steps on CPU logs, through
``trainer.log``, the same keys and values as ``GeometryMonitor``, ``RouterMonitor`` and ``CurvatureMonitor`` in
Lightning on the same model, weights, probe set, curvature batch and steps, and ends in the weights it ends in without
the monitors; a resumed run goes on with their schedule, window and batch, without duplicates, and logs the values
of the weights it resumed with (the Trainer does not restore fused experts from its own checkpoint)."""

from __future__ import annotations

import copy
import shutil

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate: pip install -e .[hf]")

from helpers import fit_logged, hf_monitor_values, read_metrics, sgd_training_arguments, tiny_hf_model  # noqa: E402

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor  # noqa: E402
from moe_lightning.monitors import CurvatureProbe, GeometryProbe, RouterProbe  # noqa: E402
from moe_lightning.monitors.hf import add_monitors  # noqa: E402

CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts_per_tok=2,
    num_experts=4,
    moe_intermediate_size=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TOKENS = torch.randint(3, 64, (8, 8), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(1))
# float32: the float64 default hits the HF SwiGLU closed-form dtype bug (tests/callbacks/test_hf_models.py)
GEOMETRY = dict(every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2, dtype="float32")
# The curvature of the first training batch (rows 0-3) at fit start and after step 2, of the whole model and of the
# routers; a few products each, as the values only need to be the same in both loops.
CURVATURE = dict(
    every_n_steps=2, eigen_max_iter=4, trace_max_samples=2, density=False, param_groups={"router": "*mlp.gate.*"}
)
FIRST_BATCH = {"input_ids": TOKENS[:4], "labels": TOKENS[:4]}


class Rows(Dataset):
    def __len__(self) -> int:
        return len(TOKENS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": TOKENS[i], "labels": TOKENS[i]}


def probe_loader() -> DataLoader:
    return DataLoader(TensorDataset(PROBE), batch_size=4)


def hf_train(
    model, tmp_path, monitors: bool, max_steps: int = 2, resume: bool = False, save_steps: int = 0, callbacks=()
):
    args = sgd_training_arguments(
        tmp_path,
        batch_size=4,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=list(callbacks))
    if monitors:
        probes = GeometryProbe(**GEOMETRY), RouterProbe(every_n_steps=1), probe_loader(), CurvatureProbe(**CURVATURE)
        add_monitors(trainer, *probes, curvature_data=FIRST_BATCH)
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def hf_values(trainer) -> dict[int, dict[str, float]]:
    return hf_monitor_values(trainer.state.log_history)


class CausalLM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(TOKENS), batch_size=4)

    def val_dataloader(self):
        return probe_loader()


def causal_lm_loss(pl_module: CausalLM, batch) -> torch.Tensor:
    (input_ids,) = batch
    return pl_module.model(input_ids=input_ids, labels=input_ids).loss


def lightning_values(model, tmp_path) -> dict[int, dict[str, float]]:
    monitors = [
        GeometryMonitor(**GEOMETRY, save_reports=False),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(**CURVATURE, loss_fn=causal_lm_loss, save_reports=False),
    ]
    fit_logged(CausalLM(model), Data(), tmp_path, monitors, max_steps=2)
    found: dict[int, dict[str, float]] = {}
    for row in read_metrics(tmp_path):
        keys = {k: float(v) for k, v in row.items() if k.startswith(MONITOR_KEYS) and v not in ("", None)}
        if keys:
            found.setdefault(int(row["step"]), {}).update(keys)
    return found


MONITOR_KEYS = ("geometry/", "router/", "curvature/")


def test_hf_trainer_logs_what_lightning_logs_and_leaves_training_as_it_was(tmp_path):
    model = tiny_hf_model("qwen3_moe", **CONFIG)
    plain, lightning_model = copy.deepcopy(model), copy.deepcopy(model)
    trainer = hf_train(model, tmp_path / "hf", monitors=True)
    hf_train(plain, tmp_path / "plain", monitors=False)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name
    ours, theirs = hf_values(trainer), lightning_values(lightning_model, tmp_path / "lightning")
    for (name, p), q in zip(model.named_parameters(), lightning_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)  # the same training, so the same weights at each probe
    assert sorted(ours) == sorted(theirs) == [0, 1, 2]
    for step in theirs:
        assert sorted(ours[step]) == sorted(theirs[step]), step
        assert "geometry/model.layers.1.mlp/jac_sigma_max/mean" in ours[step]
        for key, value in theirs[step].items():
            assert ours[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    for step in (0, 2):  # fit start and every second step
        assert {"curvature/hessian_trace", "curvature/router/hessian_top_eigenvalue"} <= ours[step].keys()
        assert ours[step]["curvature/sgd_stability_threshold"] == pytest.approx(2 / 0.1)  # the trainer's optimiser


class WeightsAtStepBegin(transformers.TrainerCallback):
    """The model's weights at the start of each step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = copy.deepcopy(model.state_dict())


def with_weights(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = tiny_hf_model("qwen3_moe", **CONFIG)
    model.load_state_dict(state_dict)
    return model


def reference_values(before_step_1: torch.nn.Module, after_step_2: torch.nn.Module) -> dict[int, dict[str, float]]:
    """In one process, on the given weights: the router window of step 1's batch (rows 4-7, routed by the weights
    after one step), and the geometry probe and the curvature (with an SGD of the trainer's rate) at step 2."""
    router = RouterProbe(every_n_steps=1)
    router.attach(before_step_1)
    router.start_batch(1)
    before_step_1.train()
    with torch.no_grad():
        before_step_1(input_ids=TOKENS[4:8], labels=TOKENS[4:8])
    window = router.end_batch(before_step_1, 2)
    router.detach()
    geometry = GeometryProbe(**GEOMETRY)
    geometry.take_probe_set(after_step_2, PROBE, baseline=False)
    curvature = CurvatureProbe(**CURVATURE)
    curvature.take_batch(after_step_2, FIRST_BATCH, baseline=False)
    sgd = torch.optim.SGD(after_step_2.parameters(), lr=0.1)
    return {1: window, 2: {**geometry(after_step_2, 2), **curvature(after_step_2, 2, optimizer=sgd)}}


def test_a_resumed_hf_run_continues_the_monitors_without_duplicates(tmp_path):
    whole_weights, weights = WeightsAtStepBegin(), WeightsAtStepBegin()
    whole = hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "whole", True, 2, callbacks=[whole_weights])
    hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "cut", monitors=True, max_steps=1, save_steps=1)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_plain")
    resumed = hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "cut", True, 2, True, callbacks=[weights])
    plain = hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "cut_plain", False, 2, True)
    callback = next(c for c in resumed.callback_handler.callbacks if hasattr(c, "geometry"))
    assert callback.geometry.probed_steps == [0, 1, 2]  # step 0 and 1 from the checkpoint, not probed again
    assert callback.curvature.computed_steps == [0, 2]  # step 0 from the checkpoint, with its batch
    assert torch.equal(callback.curvature.batch["input_ids"], FIRST_BATCH["input_ids"])
    # the history the checkpoint holds and what the resumed run added: each key once per step (hf_values checks)
    assert sorted(hf_values(resumed)) == sorted(hf_values(whole)) == [0, 1, 2]
    whole_callback = next(c for c in whole.callback_handler.callbacks if hasattr(c, "geometry"))
    assert torch.equal(callback.geometry.probe_inputs[0][0], whole_callback.geometry.probe_inputs[0][0])
    # The monitors leave the resumed training as it was: the same weights as the resumed run without them.
    for (name, p), q in zip(resumed.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    # The Trainer's own resumed training is not the uninterrupted one's. It reloads the checkpoint with a plain
    # load_state_dict(strict=False), but save_pretrained wrote the fused experts one expert at a time
    # (experts.<i>.gate_proj.weight ...): those keep the weights the resumed model was built with, while every
    # other weight is the uninterrupted run's after step 1, bit for bit.
    saved = safetensors.torch.load_file(tmp_path / "cut" / "checkpoint-1" / "model.safetensors")
    initial = tiny_hf_model("qwen3_moe", **CONFIG).state_dict()
    not_restored = set(initial) - set(saved)
    assert all(".mlp.experts." in key for key in not_restored), not_restored
    for key, value in whole_weights.at[1].items():
        assert torch.equal(weights.at[1][key], initial[key] if key in not_restored else value), key
    # So the values of what the resumed run trained itself are those of its own weights.
    ours, theirs = hf_values(resumed), hf_values(whole)
    reference = reference_values(with_weights(weights.at[1]), resumed.model)
    # step 0 and step 1's geometry come from the checkpoint; step 1's router window and step 2 from the resumed run
    assert "curvature/router/hessian_trace" in ours[0] and "curvature/router/hessian_trace" in reference[2]
    expected = {0: theirs[0], 1: {**theirs[1], **reference[1]}, 2: reference[2]}
    for step in (0, 1, 2):
        assert sorted(ours[step]) == sorted(theirs[step]) == sorted(expected[step]), step
        for key, value in expected[step].items():
            assert ours[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def test_a_probe_beside_training_is_refused_where_the_trainer_logs_at_its_current_step():
    from moe_lightning.monitors.hf import MonitorCallback

    with pytest.raises(ValueError, match=r"MonitorCallback: GeometryProbe\(background=True\) is not supported"):
        MonitorCallback(None, GeometryProbe(background=True), probe_data=[torch.zeros(1, 4, dtype=torch.long)])
