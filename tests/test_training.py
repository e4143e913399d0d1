"""Short real fits: the loss goes down for every routing, and every shipped config runs through the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import column, read_metrics
from lightning.pytorch.loggers import CSVLogger

from moe_lightning.commands import main
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.lightning.modules import CausalLMModule, MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig, TransformerMoEConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("routing", ["dense", "topk", "soft"])
def test_short_fit_lowers_loss(routing, tmp_path):
    L.seed_everything(0)
    config = MLPMoEConfig(routing=routing, input_dim=16, output_dim=16, dim=32, expert_hidden=32, num_experts=4)
    module = MLPMoEModule(config, lr=3e-3)
    data = SyntheticMoEDataModule(
        input_dim=16, output_dim=16, num_clusters=4, num_train=1024, num_val=256, batch_size=64, seed=0
    )
    trainer = L.Trainer(
        max_epochs=3,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data.setup("fit")
    first_val = trainer.validate(module, data.val_dataloader(), verbose=False)[0]["val/task_loss"]
    trainer.fit(module, data)
    last_val = trainer.callback_metrics["val/task_loss"].item()
    assert last_val < 0.8 * first_val
    rows = read_metrics(tmp_path)
    train_task = column(rows, "train/task_loss")
    assert len(train_task) >= 40
    # the logged total is the task loss plus the weighted aux losses
    row = next(r for r in rows if r.get("train/loss"))
    expected = (
        float(row["train/task_loss"])
        + 0.01 * float(row["train/aux_load_balance"])
        + 0.001 * float(row["train/aux_z_loss"])
    )
    assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-5)
    assert (float(row["train/aux_load_balance"]) == 0.0) == (routing == "dense")


def test_classification_task_logs_accuracy(tmp_path):
    L.seed_everything(0)
    module = MLPMoEModule(
        MLPMoEConfig(input_dim=8, output_dim=4, dim=16, expert_hidden=16, num_experts=4), task="classification"
    )
    data = SyntheticMoEDataModule(
        input_dim=8, output_dim=4, num_clusters=4, num_train=256, num_val=128, task="classification", batch_size=64
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    accuracy = trainer.callback_metrics["val/acc"].item()
    correct = total = 0
    module.eval()
    with torch.no_grad():
        for x, y in data.val_dataloader():
            correct += (module.model(x).output.argmax(-1) == y).sum().item()
            total += y.numel()
    assert accuracy == pytest.approx(correct / total, abs=1e-6)


def test_causal_lm_perplexity_is_exp_of_loss(tmp_path):
    L.seed_everything(0)
    cfg = TransformerMoEConfig(
        vocab_size=32, dim=16, num_heads=2, num_layers=1, expert_hidden=16, num_experts=4, max_seq_len=8
    )
    module = CausalLMModule(cfg, warmup_steps=0)
    tokens = torch.randint(0, 32, (8, 9))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert metrics["val/ppl"].item() == pytest.approx(metrics["val/task_loss"].exp().item(), rel=1e-4)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(input_dim=16, output_dim=16, dim=32, expert_hidden=32, num_experts=4))
    data = SyntheticMoEDataModule(input_dim=16, output_dim=16, num_train=256, num_val=64, batch_size=64)
    trainer = L.Trainer(
        max_steps=4,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())


CONFIGS = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name not in ("trainer", "sweep")
)


# Slow here, each run by a faster or wider test of the default suite: wikitext_topk.yaml by
# tests/test_self_contained.py (this very test, from a lone copy of the repository); wikitext_soft.yaml differs from
# it in its routing line only; wikitext_deepseek.yaml by tests/test_expert_parallel.py, through the same command
# line under FSDP2 x expert parallelism.
COVERED_ELSEWHERE = ("wikitext_topk.yaml", "wikitext_soft.yaml", "wikitext_deepseek.yaml")
SHIPPED = [
    pytest.param(config, marks=[pytest.mark.slow] if config.endswith(COVERED_ELSEWHERE) else []) for config in CONFIGS
]


@pytest.mark.integration  # `moe-lightning fit` of each shipped config
@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_runs_through_the_cli(config, tmp_path, monkeypatch):
    # From a folder outside the repository: configs name no path relative to the checkout.
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(ROOT / config),
        "--config",
        str(ROOT / "configs/trainer/cpu.yaml"),
        "--trainer.max_steps=3",
        "--trainer.limit_train_batches=3",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=null",
        "--trainer.max_epochs=1",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--summary=false",  # tests/test_run_summary.py covers the end-of-fit summary
    ]
    if "transformer" in config:
        # keep the test fast: a slice of the bundled WikiText-2 split, cached in tmp_path
        args += [
            "--data.init_args.max_train_tokens=20000",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--data.init_args.vocab_size=512",
            "--model.init_args.config.vocab_size=512",
        ]
    assert main(args) == 0
    rows = read_metrics(tmp_path)
    losses = column(rows, "train/loss")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert column(rows, "val/loss")
    # The seed is recorded with the hyperparameters of every logger (the configs set seed_everything: 0).
    (hparams,) = list(tmp_path.rglob("hparams.yaml"))
    assert yaml.safe_load(hparams.read_text())["seed_everything"] == 0


def test_cli_rejects_bad_routing_with_allowed_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "configs/mlp/topk.yaml",
                "--model.init_args.config.routing=hash",
                "--trainer.logger=false",
            ]
        )
    err = capsys.readouterr().err
    assert "routing='hash'" in err and "'dense', 'topk', 'soft'" in err
