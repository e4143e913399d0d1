"""Run by tests/callbacks/test_observation.py on 2 gloo processes: training with and without the three monitors
(a probe every 2-3 steps) ends in the same weights on every rank.

``ddp``: a 4-expert MLP MoE (router jitter on, so any use of the global RNG would show) under DDP: without the
monitors; with them; with them and the geometry probes computed beside training (``observed_background``); with
them and the probe above the matrix-free threshold (``observed_matrix_free``); with them
and every monitor failing on rank 1 in its probes (``probe``) or at its setup (``setup``); and with them while the
probe swaps a parameter's dtype through ``.data``, as it once did (``legacy_cast``, with unused parameters allowed,
so that DDP goes on), which must break DDP's averaging.
``model_parallel``: the tiny transformer under the FSDP2 x EP=2 preset (ep_cpu.yaml) and FSDP2 alone (fsdp.yaml),
without and with the monitors.

Writes ``{run: {"weights": [flat weights of rank 0, of rank 1], "warnings": [rank 0's monitor warnings]}}`` as JSON.
"""

import contextlib
import importlib
import itertools
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from helpers import quiet_trainer

import moe_lightning.monitors.geometry_probe as geometry_probe
import moe_lightning.monitors.router_probe as router_probe
import moe_lightning.monitors.sharded as sharded
from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor, WeightSpectraMonitor
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig

sys.path.insert(0, str(Path(__file__).parent))
from ep_training import data as token_data  # noqa: E402
from ep_training import module as transformer  # noqa: E402
from ep_training import preset_strategy  # noqa: E402

STEPS = 6
# the module, not the function ``moe_lightning.geometry.probe`` that the package exports under the same name
probe_module = importlib.import_module("moe_lightning.geometry.probe")


class RecordingGeometryMonitor(GeometryMonitor):
    """GeometryMonitor that keeps every delivered probe's values by step (JSON keys: the step as a string)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.values_by_step: dict[str, dict[str, float]] = {}

    def _deliver(self, trainer, reports, scalars, step) -> None:
        super()._deliver(trainer, reports, scalars, step)
        self.values_by_step[str(step)] = dict(scalars)


def monitors(source: str = "val", loss_fn=None, background: bool = False, probe_config: dict | None = None) -> list:
    return [
        RecordingGeometryMonitor(
            every_n_steps=2, max_tokens=32, source=source, background=background, probe_config=probe_config
        ),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(every_n_steps=3, eigen_max_iter=3, trace_max_samples=2, density=False, loss_fn=loss_fn),
        WeightSpectraMonitor(every_n_steps=2),
    ]


def module_loss(pl_module, batch):
    out = pl_module.loss(batch)
    return out[0] if isinstance(out, tuple) else out


def flat_weights(module: torch.nn.Module) -> list[float]:
    """Every parameter and buffer, whole (a sharded one gathered: a collective every rank enters)."""
    parts = []
    for value in module.state_dict().values():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        if value.is_floating_point():
            parts.append(value.detach().double().reshape(-1))
    return torch.cat(parts).tolist()


def run(fit) -> dict:
    """``fit()`` returns the trained module and the callbacks; every rank's weights, rank 0's monitor warnings,
    and the steps each monitor logged values at."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, callbacks = fit()
    weights = flat_weights(module)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, weights)
    owners = ("GeometryMonitor", "RouterMonitor", "Curvature", "WeightSpectra")
    monitor_warnings = [str(w.message) for w in caught if str(w.message).startswith(owners)]
    logged = {}
    for callback in callbacks:
        if isinstance(callback, GeometryMonitor):
            logged["geometry"] = sorted(callback.last_reports)
            logged["geometry_values"] = callback.values_by_step
        if isinstance(callback, RouterMonitor):
            logged["router"] = len(callback.last_metrics)
        if isinstance(callback, WeightSpectraMonitor):
            logged["weights"] = sum(key.endswith("/alpha/mean") for key in callback.last_values)
    return {"weights": everyone, "warnings": monitor_warnings, "logged": logged}


def mlp_fit(callbacks: list, strategy: str = "ddp"):
    def fit():
        L.seed_everything(0)
        config = MLPMoEConfig(input_dim=8, output_dim=8, dim=16, expert_hidden=16, num_experts=4, jitter_noise=0.2)
        module = MLPMoEModule(config)
        data = SyntheticMoEDataModule(input_dim=8, output_dim=8, num_train=256, num_val=64, batch_size=16)
        quiet_trainer(2, strategy, STEPS, callbacks, limit_val_batches=1.0).fit(module, data)
        return module, callbacks

    return fit


def on_rank_one(error: str):
    """A replacement that raises ``error`` on rank 1 and calls the original elsewhere."""

    def wrap(original):
        def broken(*args, **kwargs):
            if dist.get_rank() == 1:
                raise RuntimeError(error)
            return original(*args, **kwargs)

        return broken

    return wrap


@contextlib.contextmanager
def patched(target, name: str, replacement):
    original = getattr(target, name)
    setattr(target, name, replacement(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def legacy_cast(original):
    """The probe's old cast: the module's floating tensors swapped to the probe's dtype (float64) through ``.data``,
    which it did whatever the view (today a view that casts on read is lent nothing, and ``dtype`` is None)."""

    def with_data_swap(module, dtype, fn):
        saved, dtype = [], dtype or torch.float64
        try:
            if module is not None:
                for t in itertools.chain(module.parameters(), module.buffers()):
                    if t.is_floating_point() and t.dtype != dtype:
                        saved.append((t, t.data))
                        t.data = t.data.to(dtype)
            return fn()
        finally:
            for t, data in saved:
                t.data = data

    return with_data_swap


def ddp() -> dict:
    results = {"plain": run(mlp_fit([])), "observed": run(mlp_fit(monitors()))}
    results["observed_background"] = run(mlp_fit(monitors(background=True)))
    # the probe above the matrix-free threshold (D = 16), which hands freed pages back after each step
    results["observed_matrix_free"] = run(mlp_fit(monitors(probe_config={"matrix_free_threshold": 8})))
    with (
        patched(sharded, "probe_statistics", on_rank_one("injected probe failure")),
        patched(router_probe, "batch_sums", on_rank_one("injected router failure")),
    ):
        failing_loss = on_rank_one("injected curvature failure")(module_loss)
        results["probe"] = run(mlp_fit(monitors(loss_fn=failing_loss)))
    with (
        patched(geometry_probe, "find_moe_layers", on_rank_one("injected setup failure")),
        patched(router_probe, "find_moe_layers", on_rank_one("injected setup failure")),
        patched(CurvatureMonitor, "_check_setup", on_rank_one("injected setup failure")),
    ):
        results["setup"] = run(mlp_fit(monitors()))
    # With the .data swap, DDP's reducer no longer sees the swapped parameters' gradients: plain "ddp" stops with
    # "parameters that were not used", and with unused parameters allowed the ranks stop averaging them, silently.
    with patched(probe_module, "with_cast_copies", legacy_cast):
        results["legacy_cast"] = run(mlp_fit(monitors(), "ddp_find_unused_parameters_true"))
    return results


def model_parallel() -> dict:
    results = {}
    for preset in ("ep_cpu.yaml", "fsdp.yaml"):
        for observed in (False, True):

            def fit(preset=preset, observed=observed):
                module = transformer()
                # asked to probe beside training, GeometryMonitor says why it cannot here and probes in the step
                callbacks = monitors(source="train", background=True) if observed else []
                # 3 steps: probes at 0, 2 and the end of training (3), router windows at every step
                quiet_trainer(2, preset_strategy(preset), 3, callbacks).fit(module, token_data(2))
                return module, callbacks

            results[f"{preset.removesuffix('.yaml')}/{'observed' if observed else 'plain'}"] = run(fit)
    return results


def main(out_path: str, case: str) -> None:
    results = {"ddp": ddp, "model_parallel": model_parallel}[case]()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
