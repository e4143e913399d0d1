"""The CUDA paths against their CPU references: every MoELayer dispatch on CUDA against the CPU loop path (float32,
forward and backward), the bf16 ``grouped_mm`` path against the bf16 loop path, the float64 geometry probe on CUDA
against the same probe on CPU, and a bf16-mixed fit of the tiny config with GeometryMonitor. Skipped without a CUDA
device (tests/conftest.py)."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
from helpers import column, dispatch_case, read_metrics
from lightning.pytorch.loggers import CSVLogger

from moe_lightning.adapters import find_moe_layers
from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn import experts
from moe_lightning.nn.layer import MoEConfig, MoELayer
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def ieee_float32_matmuls():
    """TF32 would round float32 matmul inputs to 10 mantissa bits; the CPU references are full float32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def forward_backward(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, input gradient and the three weight gradients (on the CPU), and the aux, of one forward and backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y, aux = layer(x)
    y.backward(grad_out)
    tensors = (y, x.grad, layer.w_in.grad, layer.w_out.grad, layer.router.weight.grad)
    return [t.detach().cpu().float() for t in tensors], aux


@pytest.mark.parametrize(
    ("routing", "capacity_factor", "activation"),
    [("topk", None, "gelu"), ("topk", 0.75, "swiglu"), ("soft", None, "gelu")],
)
def test_every_dispatch_on_cuda_matches_the_cpu_loop_path(routing, capacity_factor, activation):
    cpu_layer, x, grad_out = dispatch_case(routing, capacity_factor, activation)
    reference, reference_aux = forward_backward(cpu_layer, x, grad_out)
    for dispatch in ["loop", "sorted", "grouped", "auto"] + (["bmm"] if routing == "soft" else []):
        layer = copy.deepcopy(cpu_layer).to(CUDA)
        layer.config.dispatch = dispatch
        got, aux = forward_backward(layer, x.to(CUDA), grad_out.to(CUDA))
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=dispatch)
        assert torch.equal(aux.tokens_per_expert.cpu(), reference_aux.tokens_per_expert), dispatch
        assert aux.dropped.item() == reference_aux.dropped.item(), dispatch


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_grouped_mm_matches_the_bf16_loop_path(activation, monkeypatch):
    """The path a bf16 run takes on CUDA (``dispatch="auto"`` is ``grouped_mm`` there) against one expert at a time."""
    monkeypatch.setattr(experts, "_warned_fallback", set())  # a fallback to 'sorted' warns (once per process)
    torch.manual_seed(0)
    config = MoEConfig(dim=16, expert_hidden=32, num_experts=8, top_k=2, activation=activation, dispatch="loop")
    loop = MoELayer(config).to(CUDA, torch.bfloat16)
    grouped = copy.deepcopy(loop)
    grouped.config.dispatch = "grouped"
    x = torch.randn(96, 16, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*using 'sorted'")  # grouped_mm itself, not the fallback
        expected, expected_aux = loop(x)
        got, aux = grouped(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(aux.tokens_per_expert, expected_aux.tokens_per_expert)
    # bf16 keeps 8 bits of mantissa: the two paths round their matmuls apart by about 2**-8 of the output's scale
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale)


def test_float64_probe_on_cuda_matches_the_probe_on_cpu():
    torch.manual_seed(0)
    model = MLPMoE(MLPMoEConfig(input_dim=8, output_dim=8, dim=16, expert_hidden=16, num_experts=4, num_blocks=1))
    x = torch.randn(96, 16)
    config = ProbeConfig(dtype=torch.float64, subspace_rank=4)
    (cpu_view,) = find_moe_layers(model)
    reference = probe(cpu_view, x, config)
    (cuda_view,) = find_moe_layers(model.to(CUDA))
    report = probe(cuda_view, x.to(CUDA), config)
    expected, got = reference.scalars("g"), report.scalars("g")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-7, abs=1e-9, nan_ok=True), key
    assert report.matrices.keys() == reference.matrices.keys()
    for key, matrix in reference.matrices.items():
        torch.testing.assert_close(report.matrices[key].cpu(), matrix, rtol=1e-7, atol=1e-9, equal_nan=True, msg=key)


def test_bf16_mixed_fit_on_cuda_trains_and_probes(tmp_path):
    L.seed_everything(0)
    module = MLPMoEModule(MLPMoEConfig(input_dim=16, output_dim=16, dim=32, expert_hidden=32, num_experts=4))
    data = SyntheticMoEDataModule(input_dim=16, output_dim=16, num_train=256, num_val=64, batch_size=64)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=6,
        precision="bf16-mixed",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[GeometryMonitor(every_n_steps=3, max_tokens=64)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    rows = read_metrics(tmp_path)
    losses = column(rows, "train/loss")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in module.parameters())
    sigma = column(rows, "geometry/blocks.0.ffn/jac_sigma_max/mean")
    assert sigma and all(math.isfinite(v) and v > 0 for v in sigma)
