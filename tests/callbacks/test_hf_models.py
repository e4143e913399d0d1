"""GeometryMonitor and RouterMonitor plugged into tiny random Hugging Face MoE language models (no download): a
short ``Trainer.fit`` logs geometry keys for every MoE layer to a CSVLogger, and the logged values agree with a
direct probe of the same tokens and weights.

Shape legend: ``B`` batch, ``T`` sequence length, ``N = B * T`` tokens, ``D`` model dim.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")

from helpers import fit_logged, read_metrics, tiny_hf_model  # noqa: E402

from moe_lightning.adapters import find_moe_layers  # noqa: E402
from moe_lightning.callbacks import GeometryMonitor, RouterMonitor  # noqa: E402
from moe_lightning.geometry import finalize, probe_statistics  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# family -> (extra config, MoE layer names)
FAMILIES = {
    "mixtral": (dict(num_local_experts=4), ["layers.0.mlp", "layers.1.mlp"]),
    "qwen2_moe": (
        dict(num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=24),
        ["layers.0.mlp", "layers.0.mlp.shared_expert", "layers.1.mlp", "layers.1.mlp.shared_expert"],
    ),
    "qwen3_moe": (dict(num_experts=4, moe_intermediate_size=8), ["layers.0.mlp", "layers.1.mlp"]),
    "olmoe": (dict(num_experts=4), ["layers.0.mlp", "layers.1.mlp"]),
}


class CausalLM(L.LightningModule):
    """The minimal wrapper a user writes: next-token loss of a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def build(family: str) -> torch.nn.Module:
    extra, _ = FAMILIES[family]
    return tiny_hf_model(family, **COMMON, **extra)


class Tokens(L.LightningDataModule):
    """Random token ids; the probe set is drawn from the training data (there is no validation data)."""

    def __init__(self, vocab_size: int, batch_size: int = 4) -> None:
        super().__init__()
        self.tokens = torch.randint(3, vocab_size, (8, 8), generator=torch.Generator().manual_seed(0))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens), batch_size=self.batch_size)


def fit(family: str, tmp_path: Path, geometry: GeometryMonitor, data=None) -> tuple[CausalLM, list[dict]]:
    module = CausalLM(build(family))
    data = data if data is not None else Tokens(COMMON["vocab_size"])
    return module, fit_logged(module, data, tmp_path, [geometry, RouterMonitor(log_every_n_steps=1)])


# One family in the quick tier; every family in the whole suite.
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f == "mixtral" else pytest.mark.integration) for f in FAMILIES]
)
def test_geometry_and_router_monitors_on_hf_model(family, tmp_path):
    layer_names = [f"model.{name}" for name in FAMILIES[family][1]]
    # float32: the float64 default hits the HF SwiGLU closed-form dtype bug (test_hf_probe_in_float64 below)
    geometry = GeometryMonitor(
        every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2, dtype="float32", source="train"
    )
    module, rows = fit(family, tmp_path, geometry)
    assert [v.name for v in geometry.views] == layer_names
    rows = read_metrics(tmp_path)
    keys = set().union(*(r.keys() for r in rows))
    for name in layer_names:
        experts = 1 if name.endswith("shared_expert") else 4
        for quantity in ("jac_sigma_max", "jac_frobenius", "pca_input_effective_rank"):
            for suffix in [f"e{e}" for e in range(experts)] + ["mean"]:
                values = [
                    float(r[f"geometry/{name}/{quantity}/{suffix}"])
                    for r in rows
                    if r.get(f"geometry/{name}/{quantity}/{suffix}")
                ]
                # probed at fit start (step 0) and after the step (step 1)
                assert len(values) == 2, (name, quantity, suffix)
                assert all(math.isfinite(v) and v > 0 for v in values), (name, quantity, suffix, values)
        nonfinite = [
            float(r[f"geometry/{name}/nonfinite_tokens"]) for r in rows if r.get(f"geometry/{name}/nonfinite_tokens")
        ]
        assert nonfinite == [0.0, 0.0]
        if experts > 1:  # router statistics of the live batches, per routed block
            assert f"router/{name}/load_cv" in keys and f"router/{name}/entropy" in keys
            health = [r for r in rows if r.get(f"router/{name}/utilisation_max")]
            assert len(health) == 1  # router health for every adapted family too
            for r in health:
                shares = [float(r[f"router/{name}/load/e{e}"]) for e in range(4)]
                assert float(r[f"router/{name}/utilisation_max"]) == pytest.approx(4 * max(shares))
                assert float(r[f"router/{name}/dead_fraction"]) == pytest.approx(sum(s == 0 for s in shares) / 4)
                assert 0.25 <= float(r[f"router/{name}/diversity"]) <= 1.0
            loads = [
                sum(float(r[f"router/{name}/load/e{e}"]) for e in range(4))
                for r in rows
                if r.get(f"router/{name}/load/e0")
            ]
            assert len(loads) == 1 and all(v == pytest.approx(1.0) for v in loads)

    # the last logged values equal a direct probe of the same probe tokens with the trained weights
    captured: dict[str, torch.Tensor] = {}
    views = find_moe_layers(module.model)
    handles = [
        v.module.register_forward_hook(
            lambda m, a, k, o, names=[w.name for w in views if w.module is v.module]: captured.update(
                {n: (a[0] if a else k["hidden_states"]).detach().reshape(-1, COMMON["hidden_size"]) for n in names}
            ),
            with_kwargs=True,
        )
        for v in views
        if not v.name.endswith("shared_expert")
    ]
    module.eval()
    with torch.no_grad():
        module(torch.cat([t for t in geometry.probe_inputs]))
    for handle in handles:
        handle.remove()
    last = {k: v for r in rows for k, v in r.items() if v not in (None, "")}
    for view in views:
        report = finalize(probe_statistics(view, captured[view.name][:32], geometry.probe_config))
        for key, value in report.scalars(f"geometry/{view.name}").items():
            if key in last and math.isfinite(value):
                assert float(last[key]) == pytest.approx(value, rel=1e-4, abs=1e-8), key


def test_hf_probe_in_float64(tmp_path):
    geometry = GeometryMonitor(every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed probe warns; make it fail the test
        warnings.filterwarnings("ignore", message=".*(LeafSpec|smaller than the logging interval|num_workers).*")
        _, rows = fit("mixtral", tmp_path, geometry)
    assert any(r.get("geometry/model.layers.0.mlp/jac_sigma_max/mean") for r in rows)


@pytest.mark.integration  # a fit of a Hugging Face model
def test_fit_start_baseline_without_datamodule(tmp_path):
    tokens = torch.randint(3, COMMON["vocab_size"], (8, 8), generator=torch.Generator().manual_seed(0))
    geometry = GeometryMonitor(every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2, dtype="float32")
    _, rows = fit("mixtral", tmp_path, geometry, data=DataLoader(TensorDataset(tokens), batch_size=4))
    steps = [int(r["step"]) for r in rows if r.get("geometry/model.layers.0.mlp/jac_sigma_max/mean")]
    assert steps == [0, 1]


@pytest.mark.integration  # a fit of a Hugging Face model
def test_default_source_falls_back_to_train_data(tmp_path):
    geometry = GeometryMonitor(every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2, dtype="float32")
    _, rows = fit("mixtral", tmp_path, geometry)
    steps = [int(r["step"]) for r in rows if r.get("geometry/model.layers.0.mlp/jac_sigma_max/mean")]
    assert steps == [0, 1]
