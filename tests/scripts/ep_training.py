"""Run by tests/test_expert_parallel.py: 10 training steps of a tiny TransformerMoE on 2 gloo processes with the
strategies of configs/trainer/ep_cpu.yaml (FSDP2 x EP=2) and of fsdp.yaml (FSDP2 alone), and resumed at step 5 from
the EP=2 run's distributed checkpoint (saved at step 5) with EP=1 and with EP=2;
then, on rank 0, the same 10 steps in one process on the union of the ranks' batches of each step. Writes the
per-step losses (mean over ranks) to losses.json in the folder given. Last, GeometryMonitor's fit-start probe under
FSDP2 x EP=2 (the cases of GEOMETRY_CASES) and the one-process probe of the same initial model on the same probe
set, in geometry.json, and ep_layer.py's layer checks on the same 2 ranks, in layer.json. With a second argument 4:
on 4 ranks, EP=2 (two replicas of every expert) and EP=4 against one process, the top-k probe with two expert
groups, and the layer checks."""

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import yaml
from helpers import quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from moe_lightning.adapters import find_moe_layers, native
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.callbacks import GeometryMonitor, RouterMonitor, WeightSpectraMonitor
from moe_lightning.common import observation
from moe_lightning.distributed.layout import is_parallelized
from moe_lightning.geometry import probe
from moe_lightning.lightning.modules import CausalLMModule
from moe_lightning.lightning.strategy import ExpertParallelStrategy
from moe_lightning.nn.layer import MoELayer
from moe_lightning.nn.models import TransformerMoEConfig

sys.path.insert(0, str(Path(__file__).parent))
from ep_layer import check_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, SEQ, VOCAB = 10, 4, 8, 64


class Losses(Callback):
    """The training loss of every step, averaged over ranks (each rank's batch has the same size), and every batch
    of every rank, concatenated per step."""

    def __init__(self):
        self.values, self.batches = [], []
        self.view_warnings: list[str] = []  # FSDP2's "returned a view tensor", filled by fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, [t.clone() for t in batch])
            self.batches.append(tuple(torch.cat(parts) for parts in zip(*gathered, strict=True)))


class BlockShardedLM(CausalLMModule):
    """The LightningModule with FSDP2 applied as a user may apply it to a model of their own: one group per
    transformer block, then the root, so that an MoE layer has no group of its own."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if is_parallelized(self.model):
            return
        mesh = self.trainer.strategy.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def module(routing: str = "topk", cls: type[CausalLMModule] = CausalLMModule, **overrides) -> CausalLMModule:
    """A tiny transformer (a ``cls``), the same initial weights on every call; ``overrides`` of its config."""
    torch.manual_seed(0)
    config = TransformerMoEConfig(
        vocab_size=VOCAB,
        dim=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=SEQ,
        expert_hidden=16,
        num_experts=4,
        top_k=2,
        routing=routing,
        activation="swiglu",
        **overrides,
    )
    return cls(config, lr=3e-3, warmup_steps=2)


def data(batch_size: int, ranks: int = 2):
    """Epochs of one step on ``ranks`` ranks: a run resumed at an epoch's end sees the batches of the run it
    continues (within an epoch, a resumed plain DataLoader does not)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (ranks * BATCH, SEQ + 1), generator=gen)
    dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def preset_strategy(name: str) -> ExpertParallelStrategy:
    """The strategy a preset names, with gloo for the CPU."""
    spec = yaml.safe_load((ROOT / "configs" / "trainer" / name).read_text())["trainer"]["strategy"]
    assert spec["class_path"] == "moe_lightning.lightning.strategy.ExpertParallelStrategy"
    return ExpertParallelStrategy(**{**spec["init_args"], "process_group_backend": "gloo"})


def fit(strategy, devices: int, loader, ckpt_dir=None, ckpt_path=None, router=None, spectra=None) -> Losses:
    """Train ``module()`` for 10 steps with gradient clipping; every rank's loss and batch of every step."""
    losses = Losses()
    callbacks = [losses] + [monitor for monitor in (router, spectra) if monitor is not None]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=STEPS // 2, save_top_k=-1))
    trainer = quiet_trainer(
        devices, strategy, STEPS, callbacks, enable_checkpointing=ckpt_dir is not None, gradient_clip_val=1.0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module(), loader, ckpt_path=ckpt_path)
    losses.view_warnings += [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
    return losses


class Tokens(L.LightningDataModule):
    """The same data as a datamodule, whose validation loader gives GeometryMonitor one probe set on every rank."""

    def __init__(self, ranks: int = 2):
        super().__init__()
        self.ranks = ranks

    def train_dataloader(self):
        return data(BATCH, self.ranks)

    def val_dataloader(self):
        return data(BATCH, self.ranks)


class CountGathers:
    """Counts the calls of ``gather_experts`` (every expert's weights on one rank), as the native views lend it,
    while it is entered."""

    def __init__(self):
        self.calls, self._original = 0, native.gather_experts

    def __enter__(self):
        original = self._original

        def counted(layer):
            self.calls += int(layer.expert_parallel_size > 1)
            return original(layer)

        native.gather_experts = counted
        return self

    def __exit__(self, *exc):
        native.gather_experts = self._original


# DeepSeek-V3-style layers: sigmoid scores, aux-free bias, and a shared expert, which every rank holds whole and
# probes as a view of its own, with its share of the tokens and without gathering the routed experts
DEEPSEEK = {"scoring": "sigmoid", "load_balancing": "aux_free", "num_shared_experts": 1, "shared_expert_hidden": 16}

GEOMETRY_CASES = {  # name: (model config overrides, GeometryMonitor options beyond the common ones)
    "topk": ({"routing": "topk"}, {}),
    "soft": ({"routing": "soft"}, {}),
    "deepseek": (DEEPSEEK, {}),
    # no MoE layer: FSDP2 alone, the dense FFNs gathered one at a time
    "dense": ({"routing": "dense"}, {}),
    # D = 32 > 16: the spectra are matrix-free, the layer's through products summed over the expert group
    "topk_matrix_free": ({}, {"probe_config": {"matrix_free_threshold": 16, "matrix_free_rank": 4}}),
    "topk_bootstrap": ({}, {"bootstrap": 8}),
    # the whole layer through torch.func: the experts are gathered on every rank
    "topk_func": ({}, {"probe_config": {"layer_jacobian_method": "func"}}),
    # FSDP2 by blocks (BlockShardedLM): each MoE layer's weights are gathered with the block that holds them
    "topk_block_sharded": ({"cls": BlockShardedLM}, {}),
}


def geometry(case: str, devices: int = 2) -> dict:
    """The fit-start probe under FSDP2 x EP=2 (float64, 32 tokens) on ``devices`` ranks, and one process's probe of
    the initial model; and how often a rank gathered every expert of a layer."""
    overrides, options = GEOMETRY_CASES[case]
    # subspace_rank=2: a rank-8 PCA subspace of the ~16 tokens an expert gets here has no eigen-gap to be defined by;
    # at_fit_end=False: the last reports are those of the fit-start probe, which the initial model gives alone
    monitor = GeometryMonitor(
        every_n_steps=None,
        at_fit_end=False,
        max_tokens=32,
        subspace_rank=2,
        log_media=False,
        save_reports=False,
        **options,
    )
    trainer = quiet_trainer(devices, ExpertParallelStrategy(2, process_group_backend="gloo"), 1, [monitor])
    with CountGathers() as gathers:
        trainer.fit(module(**overrides), Tokens(devices))
    if dist.get_rank() != 0:
        return {}
    ep = {k: v for name, r in monitor.last_reports.items() for k, v in r.scalars(f"geometry/{name}").items()}
    ep.update({f"bootstrap/{name}/{k}": v for name, r in monitor.last_reports.items() for k, v in bootstrap(r)})
    single, reference = {}, module(**{**overrides, "cls": CausalLMModule})
    views = find_moe_layers(reference.model)
    with observation(reference):
        captured = capture_layer_inputs(reference, views, monitor.probe_inputs)
        for view in views:
            report = probe(view, captured[view.name][:32], monitor.probe_config)
            single.update(report.scalars(f"geometry/{view.name}"))
            single.update({f"bootstrap/{view.name}/{k}": v for k, v in bootstrap(report)})
    return {"ep": ep, "single": single, "gathers": gathers.calls}


def failing_probe() -> dict:
    """The fit-start probe under EP=2 with expert functions that raise on rank 1 only (the probe's, not the
    training's: training runs the sorted path): rank 0 must not wait for rank 1 in a collective. Returns the layers
    reported, the probe warnings of each rank and the steps trained."""
    original = MoELayer.expert_fn

    def failing(layer, e, x):
        # after the view check, which would refuse the layer first: the failure this case is about is the probe's
        if dist.get_rank() == 1 and monitor.views_checked:
            raise RuntimeError("expert function failed on rank 1")
        return original(layer, e, x)

    monitor = GeometryMonitor(every_n_steps=None, max_tokens=32, subspace_rank=2, log_media=False, save_reports=False)
    # a rank left waiting fails within a minute instead of the default half hour
    strategy = ExpertParallelStrategy(2, process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = quiet_trainer(2, strategy, 2, [monitor])
    MoELayer.expert_fn = failing
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module("topk"), Tokens())
    finally:
        MoELayer.expert_fn = original
    messages = [str(w.message) for w in caught if "GeometryMonitor: the probe failed" in str(w.message)]
    gathered = [None, None]
    dist.all_gather_object(gathered, messages)
    return {"reports": sorted(monitor.last_reports), "warnings": gathered, "steps": trainer.global_step}


def bootstrap(report) -> list[tuple[str, float]]:
    """Every bootstrap replicate of every quantity a report holds, flattened (none without a bootstrap)."""
    values = (report.bootstrap or {}).get("values", {})
    return [
        (f"{key}/{i}", float(v)) for key, vals in values.items() for i, v in enumerate(torch.as_tensor(vals).flatten())
    ]


def initial_spectra() -> WeightSpectraMonitor:
    """The weight spectra of the initial weights (the same in every run) only."""
    return WeightSpectraMonitor(every_n_steps=10 * STEPS, at_fit_end=False)


def single_process(
    out: Path, result: dict, run: Losses, router: RouterMonitor, spectra: dict[str, WeightSpectraMonitor]
) -> None:
    """On rank 0: the 10 steps in one process, each on the batches of every rank of ``run`` together, the router
    statistics of the last window of both, and the weight spectra of each run's initial weights; everything into
    losses.json."""
    single_router, single_spectra = RouterMonitor(log_every_n_steps=STEPS // 2), initial_spectra()
    union = torch.utils.data.DataLoader(run.batches, batch_size=None)
    result["single"] = fit("auto", 1, union, router=single_router, spectra=single_spectra).values
    result["router"] = {"ep": router.last_metrics, "single": single_router.last_metrics}
    result["weights"] = {name: m.last_values for name, m in spectra.items()} | {"single": single_spectra.last_values}
    (out / "losses.json").write_text(json.dumps(result))


def main_4(out: Path) -> None:
    """4 ranks: EP=2 with two replicas of every expert (the (2, 2) expert mesh), EP=4, and the layer checks."""
    router, spectra = RouterMonitor(log_every_n_steps=STEPS // 2), {"ep2": initial_spectra(), "ep4": initial_spectra()}
    ep2_strategy = ExpertParallelStrategy(2, process_group_backend="gloo")
    ep2 = fit(ep2_strategy, 4, data(BATCH, 4), router=router, spectra=spectra["ep2"])
    ep4 = fit(ExpertParallelStrategy(4, process_group_backend="gloo"), 4, data(BATCH, 4), spectra=spectra["ep4"])
    result = {"ep2": ep2.values, "ep4": ep4.values}
    probes = {"topk": geometry("topk", devices=4)}  # two expert groups of 2 ranks, each probing its tokens
    layer = check_layer(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() != 0:
        return
    (out / "geometry.json").write_text(json.dumps(probes))
    (out / "layer.json").write_text(json.dumps(layer))
    single_process(out, result, ep2, router, spectra)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    ep2_router, spectra = (
        RouterMonitor(log_every_n_steps=STEPS // 2),
        {"ep2": initial_spectra(), "fsdp": initial_spectra()},
    )
    ep2 = fit(
        preset_strategy("ep_cpu.yaml"), 2, data(BATCH), ckpt_dir=out / "ckpt", router=ep2_router, spectra=spectra["ep2"]
    )
    fsdp = fit(preset_strategy("fsdp.yaml"), 2, data(BATCH), spectra=spectra["fsdp"])
    result = {"ep2": ep2.values, "fsdp": fsdp.values, "view_warnings": ep2.view_warnings + fsdp.view_warnings}
    (checkpoint,) = sorted((out / "ckpt").glob("*step=5*"))
    for name, size in (("resume_ep1", 1), ("resume_ep2", 2)):
        strategy = ExpertParallelStrategy(size, process_group_backend="gloo")
        result[name] = fit(strategy, 2, data(BATCH), ckpt_path=checkpoint).values
    probes = {case: geometry(case) for case in GEOMETRY_CASES}
    probes["failing"] = failing_probe()
    layer = check_layer(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() != 0:
        return
    (out / "geometry.json").write_text(json.dumps(probes))
    (out / "layer.json").write_text(json.dumps(layer))
    single_process(out, result, ep2, ep2_router, spectra)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:] == ["4"]:
        main_4(Path(sys.argv[1]))
    else:
        main(sys.argv[1])
