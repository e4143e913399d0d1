"""Helpers the tests share: tiny random Hugging Face MoE models of each family (no download), reading what a
CSVLogger wrote, numpy references two test files share, and running and setting up the multi-process test scripts.
Fixtures built on them live in ``conftest.py``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

# family -> (transformers config class, model class)
HF_MOE_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


def tiny_hf_model(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """A random ``<family>ForCausalLM`` built from ``config`` alone, with weights drawn after ``manual_seed(seed)``."""
    import transformers

    config_name, model_name = HF_MOE_CLASSES[family]
    hf_config = getattr(transformers, config_name)(**config)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(hf_config)


def dispatch_case(routing: str, capacity_factor: float | None, activation: str):
    """The layer on which the dispatch tests compare every path with the loop path (D = 16, H = 32, 8 experts, top-2,
    loop dispatch), drawn after ``manual_seed(0)``, then ``(4, 24, 16)`` inputs and output gradients."""
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    config = MoEConfig(
        dim=16,
        expert_hidden=32,
        num_experts=8,
        top_k=2,
        routing=routing,
        activation=activation,
        capacity_factor=capacity_factor,
        dispatch="loop",
    )
    layer = MoELayer(config)
    return layer, torch.randn(4, 24, 16), torch.randn(4, 24, 16)


def sgd_training_arguments(output_dir: str | Path, batch_size: int, **settings):
    """Hugging Face ``TrainingArguments`` for a short deterministic CPU run that reports to nothing: plain SGD at a
    constant rate, no weight decay or clipping, rows in order; ``settings`` add to them or replace them."""
    import transformers

    return transformers.TrainingArguments(
        **{
            "output_dir": str(output_dir),
            "use_cpu": True,
            "per_device_train_batch_size": batch_size,
            "learning_rate": 0.1,
            "optim": "sgd",
            "lr_scheduler_type": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "train_sampling_strategy": "sequential",
            "report_to": [],
            "logging_steps": 1000,
            "save_strategy": "no",
            "seed": 0,
            **settings,
        }
    )


def quiet_fit(module, data, log_dir: str | Path, callbacks: list, max_steps: int = 1) -> None:
    """A short quiet ``Trainer.fit`` of ``module`` on ``data`` with ``callbacks``, logging every step to a CSVLogger
    in ``log_dir``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(log_dir),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)


def fit_logged(module, data, log_dir: str | Path, callbacks: list, max_steps: int = 1) -> list[dict[str, str]]:
    """:func:`quiet_fit`; the rows it logged."""
    quiet_fit(module, data, log_dir, callbacks, max_steps)
    return read_metrics(log_dir)


def fit_warned(module, data, log_dir: str | Path, callbacks: list, max_steps: int = 2) -> list[str]:
    """:func:`quiet_fit`, recording every warning the fit raises; their messages."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_fit(module, data, log_dir, callbacks, max_steps)
    return [str(w.message) for w in caught]


def read_metrics(log_dir: str | Path) -> list[dict[str, str]]:
    """The rows of the one ``metrics.csv`` under ``log_dir``."""
    (path,) = list(Path(log_dir).rglob("metrics.csv"))
    with open(path) as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of one key in CSVLogger rows."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    """The logged values of one key, in row order."""
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def load_script(path: str | Path):
    """Import a script of ``scripts/`` as a module (registered in ``sys.modules``: dataclasses look it up there)."""
    import importlib.util
    import sys

    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def hf_monitor_values(log_history: list[dict]) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the monitors' keys in a Hugging Face trainer's log history, on Lightning's axis: the
    trainer logs a router window, as its loss, once the step its batches made is done (``global_step`` one past
    Lightning's label, the step of the weights that routed them). Fails on a key logged twice at one step."""
    found: dict[int, dict[str, float]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(("geometry/", "router/", "curvature/")):
                step = entry["step"] - key.startswith("router/")
                assert key not in found.get(step, {}), f"{key} logged twice at step {step}"
                found.setdefault(step, {})[key] = value
    return found


def numpy_health(load: np.ndarray) -> dict[str, float]:
    """Router health by hand: utilisation over the ideal load, dead experts, exp(entropy of the load) / E."""
    util = load * len(load) / load.sum()
    share = load / load.sum()
    entropy = -sum(s * math.log(s) for s in share if s > 0)
    return {
        "utilisation_p50": np.percentile(util, 50),
        "utilisation_p90": np.percentile(util, 90),
        "utilisation_max": util.max(),
        "dead_fraction": float((load == 0).mean()),
        "diversity": math.exp(entropy) / len(load),
    }


def quiet_trainer(devices: int, strategy, max_steps: int, callbacks: list, **options):
    """A CPU Trainer without logger, progress bar, model summary, validation or checkpoints, unless ``options``
    (further Trainer arguments) ask for them: the set-up of the multi-process test scripts."""
    import lightning as L

    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        **{**quiet, **options},
    )


def run_test_script(
    name: str, argument: str | Path, cwd: str | Path, extra: list[str] | None = None, torchrun: int = 0
) -> None:
    """Run ``tests/scripts/<name>`` in a fresh Python (one torch thread, W&B offline) with ``argument`` (and the
    ``extra`` arguments), or with ``torchrun`` > 0 in that many processes started by ``torchrun --standalone``
    (``python -m torch.distributed.run``); fail with its stderr when it fails. The multi-process tests launch their
    gloo workers this way."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # the package from this checkout, and these helpers for the scripts
    path = os.pathsep.join([str(root), str(root / "tests")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    result = subprocess.run(
        [*launcher, str(root / "tests" / "scripts" / name), str(argument), *(extra or [])],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def tanh_mlp_problem(widths: tuple[int, int, int], num_points: int, input_scales=None, seed: int = 0):
    """A ``widths[0]-widths[1]-widths[2]`` tanh MLP with MSE loss on random points (inputs scaled per feature by
    ``input_scales``), in float64: ``(loss_fn, params, full Hessian)``, the Hessian by reverse-mode autograd."""
    from torch.autograd.functional import hessian

    d_in, d_hidden, d_out = widths
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_points, d_in, generator=gen, dtype=torch.float64)
    if input_scales is not None:
        x = x * torch.tensor(input_scales, dtype=torch.float64)
    y = torch.randn(num_points, d_out, generator=gen, dtype=torch.float64)
    shapes = [(d_in, d_hidden), (d_hidden,), (d_hidden, d_out), (d_out,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]

    def loss_of(w1, b1, w2, b2):
        return ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()

    def flat_loss(theta):
        return loss_of(
            *(t.view(p.shape) for t, p in zip(theta.split([p.numel() for p in params]), params, strict=True))
        )

    full = hessian(flat_loss, torch.cat([p.detach().reshape(-1) for p in params]))
    return (lambda: loss_of(*params)), params, full


class FunctionOnlyView:
    """A view of the same layer that knows its experts only as token functions: no ``expert_jacobian_operator``, so
    no factors (a declared library layer, or a view wrapping arbitrary modules), and the probe forms every Jacobian
    it uses, or estimates above the threshold."""

    def __init__(self, view):
        self.view, self.name, self.module, self.num_experts = view, view.name, view.module, view.num_experts

    def gates(self, x):
        return self.view.gates(x)

    def expert(self, e):
        return self.view.expert(e)

    def expert_hidden(self, e):
        return self.view.expert_hidden(e)

    def expert_jacobian(self, e, x):  # the exact path's reference forms J from the closed form
        return self.view.expert_jacobian(e, x)


def assert_same_report(actual, expected, rel: float, abs_: float, spectra: bool = True) -> None:
    """Every scalar and matrix (and, with ``spectra``, spectrum) of two geometry reports agree, with the same keys."""
    import pytest

    a, b = expected.scalars("g"), actual.scalars("g")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_, nan_ok=True), key
    assert expected.matrices.keys() == actual.matrices.keys()
    for key, M in expected.matrices.items():
        torch.testing.assert_close(actual.matrices[key], M, rtol=rel, atol=abs_, equal_nan=True, msg=key)
    for key, S in expected.spectra.items() if spectra else ():
        torch.testing.assert_close(actual.spectra[key], S, rtol=rel, atol=abs_, equal_nan=True, msg=key)
