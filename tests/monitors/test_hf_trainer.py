"""The monitors in the Hugging Face ``Trainer``: a tiny random Qwen3-MoE trained for two steps on CPU logs, through
``trainer.log``, the same keys and values as ``GeometryMonitor`` and ``RouterMonitor`` in Lightning on the same model,
weights, probe set and steps, and ends in the weights it ends in without the monitors; a resumed run goes on with
their schedule and window, without duplicates."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate: pip install -e .[hf]")

from helpers import fit_logged, read_metrics, tiny_hf_model  # noqa: E402

from moe_lightning.callbacks import GeometryMonitor, RouterMonitor  # noqa: E402
from moe_lightning.monitors import GeometryProbe, RouterProbe  # noqa: E402
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


class Rows(Dataset):
    def __len__(self) -> int:
        return len(TOKENS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": TOKENS[i], "labels": TOKENS[i]}


def probe_loader() -> DataLoader:
    return DataLoader(TensorDataset(PROBE), batch_size=4)


def hf_train(model, tmp_path, monitors: bool, max_steps: int = 2, resume: bool = False, save_steps: int = 0):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        report_to=[],
        logging_steps=1000,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    if monitors:
        add_monitors(trainer, GeometryProbe(**GEOMETRY), RouterProbe(every_n_steps=1), probe_data=probe_loader())
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def hf_values(trainer) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the monitors' keys in the trainer's log history, on Lightning's axis: the trainer
    logs a router window, as its loss, once the step its batches made is done (``global_step`` one past Lightning's
    label, the step of the weights that routed them)."""
    found: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(("geometry/", "router/")):
                step = entry["step"] - key.startswith("router/")
                assert key not in found.get(step, {}), f"{key} logged twice at step {step}"
                found.setdefault(step, {})[key] = value
    return found


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


def lightning_values(model, tmp_path) -> dict[int, dict[str, float]]:
    monitors = [GeometryMonitor(**GEOMETRY, save_reports=False), RouterMonitor(log_every_n_steps=1)]
    fit_logged(CausalLM(model), Data(), tmp_path, monitors, max_steps=2)
    found: dict[int, dict[str, float]] = {}
    for row in read_metrics(tmp_path):
        keys = {k: float(v) for k, v in row.items() if k.startswith(("geometry/", "router/")) and v not in ("", None)}
        if keys:
            found.setdefault(int(row["step"]), {}).update(keys)
    return found


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


def test_a_resumed_hf_run_continues_the_monitors_without_duplicates(tmp_path):
    whole = hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "whole", monitors=True, max_steps=2)
    hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "cut", monitors=True, max_steps=1, save_steps=1)
    resumed = hf_train(tiny_hf_model("qwen3_moe", **CONFIG), tmp_path / "cut", True, max_steps=2, resume=True)
    callback = next(c for c in resumed.callback_handler.callbacks if hasattr(c, "geometry"))
    assert callback.geometry.probed_steps == [0, 1, 2]  # step 0 and 1 from the checkpoint, not probed again
    # the history the checkpoint holds and what the resumed run added: each key once per step (hf_values checks)
    assert sorted(hf_values(resumed)) == sorted(hf_values(whole)) == [0, 1, 2]
    for step in (0, 1, 2):
        expected, got = hf_values(whole)[step], hf_values(resumed)[step]
        assert sorted(got) == sorted(expected), step
        if step == 2:  # the resumed training itself is not the uninterrupted one's, bit for bit: keys only
            continue
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    whole_callback = next(c for c in whole.callback_handler.callbacks if hasattr(c, "geometry"))
    assert torch.equal(callback.geometry.probe_inputs[0][0], whole_callback.geometry.probe_inputs[0][0])
