"""Observation only, on the device at hand: a short fit with GeometryMonitor, RouterMonitor and CurvatureMonitor
ends in exactly the weights of the same fit without them (the check of tests/callbacks/test_observation.py, on
the package's own MLP and transformer modules, on CUDA when asked).

Each case trains three times from the same seed: twice without the monitors, once with them (a probe every 2 or 3
steps). The two plain fits are the control: where the device's kernels are not reproducible (atomics in a CUDA
scatter, say) they differ, and the case says ``not reproducible`` rather than blaming the monitors. The trainer runs
with ``deterministic="warn"``, so that an operation without a deterministic kernel is named, not fatal. Writes
``<out>/observation.json``: per case, whether the weights matched and how many tensors differed.

Usage::

    python scripts/gpu_check_observation.py OUT --device cuda          # bf16-mixed and 32-true
    python scripts/gpu_check_observation.py OUT --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import TensorDataset

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.lightning.modules import CausalLMModule, MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig, TransformerMoEConfig

STEPS = 6


def mlp_case(tiny: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    width = 16 if tiny else 64
    config = MLPMoEConfig(input_dim=8, output_dim=8, dim=width, expert_hidden=width, num_experts=4, top_k=2)
    data = SyntheticMoEDataModule(input_dim=8, output_dim=8, num_train=256, num_val=64, batch_size=32)
    return MLPMoEModule(config), data


def transformer_case(tiny: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    """A small causal LM on random tokens (the monitors draw their probe set from the validation batches)."""
    dim, seq, vocab = (16, 16, 64) if tiny else (128, 64, 512)
    config = TransformerMoEConfig(
        vocab_size=vocab, dim=dim, num_layers=2, num_heads=4, max_seq_len=seq, expert_hidden=dim, num_experts=4
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (96, seq + 1), generator=generator)
    pairs = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    data = L.LightningDataModule.from_datasets(pairs, pairs, batch_size=16)
    return CausalLMModule(config), data


CASES = {"mlp": mlp_case, "transformer": transformer_case}


def monitors() -> list[L.Callback]:
    return [
        GeometryMonitor(every_n_steps=2, max_tokens=32),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(every_n_steps=3, eigen_max_iter=3, trace_max_samples=2, density=False),
    ]


def train(case: str, tiny: bool, device: str, precision: str, observed: bool) -> tuple[dict, list[str], dict]:
    """The weights (on the CPU) after ``STEPS`` steps, the warnings the fit raised, and the steps at which each
    monitor did its work."""
    L.seed_everything(0, verbose=False)
    module, data = CASES[case](tiny)
    callbacks = monitors() if observed else []
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=STEPS,
        deterministic="warn",
        callbacks=callbacks,
        logger=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert trainer.global_step == STEPS, trainer.global_step
    weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    work = {}
    if observed:
        geometry, router, curvature = callbacks[:3]
        work = {
            "geometry_probed_steps": list(geometry.probed_steps),
            "router_keys": len(router.last_metrics or {}),
            "curvature_steps": list(curvature.computed_steps),
        }
    return weights, sorted({str(w.message).splitlines()[0][:200] for w in caught}), work


def differing(a: dict, b: dict) -> list[str]:
    return [key for key in a if not torch.equal(a[key], b[key])]


def check(case: str, tiny: bool, device: str, precision: str) -> dict:
    start = time.perf_counter()
    plain, _, _ = train(case, tiny, device, precision, observed=False)
    again, _, _ = train(case, tiny, device, precision, observed=False)
    observed, caught, work = train(case, tiny, device, precision, observed=True)
    control, effect = differing(plain, again), differing(plain, observed)
    if control:
        status = "not reproducible"
    elif effect:
        status = "failed"
    elif not all(work.values()):  # identical weights prove nothing if the monitors never probed
        status = "failed (a monitor did no work)"
    else:
        status = "ok"
    return {
        "case": f"{case} {precision}",
        "status": status,
        "tensors": len(plain),
        **work,
        "differ_without_monitors": control,
        "differ_with_monitors": effect,
        "monitor_warnings": [m for m in caught if "Monitor" in m],
        "determinism_warnings": [m for m in caught if "deterministic" in m],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed", "32-true"])
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the CPU rehearsal)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in CASES:
        for precision in args.precision:
            try:
                result = check(case, args.tiny, args.device, precision)
            except Exception as error:  # noqa: BLE001 - recorded; the next case runs
                result = {"case": f"{case} {precision}", "status": f"failed ({type(error).__name__}: {error})"}
            results.append(result)
            print(json.dumps(result), flush=True)
    (args.out / "observation.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
