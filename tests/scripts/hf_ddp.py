"""Run by tests/monitors/test_hf_ddp.py under ``torchrun --nproc_per_node 2`` (two gloo processes on CPU), as the
Hugging Face docs launch the Trainer's DDP: a tiny random Qwen3-MoE trained for two steps with the monitors
(``add_monitors``, a probe, a router window and the curvature at every step), then again without them. Each rank writes
``<out_dir>/rank<r>.pt``: the world size, its log history, the batch it trained on at each step, the weights at the
start of each step and its final weights with and without the monitors."""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from helpers import sgd_training_arguments, tiny_hf_model
from torch.utils.data import DataLoader, Dataset, TensorDataset

from moe_lightning.monitors import CurvatureProbe, GeometryProbe, RouterProbe
from moe_lightning.monitors.hf import add_monitors

CONFIG = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=8, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
TOKENS = torch.randint(3, 64, (8, 8), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(1))
# float32: the float64 default hits the HF SwiGLU closed-form dtype bug (tests/callbacks/test_hf_models.py)
GEOMETRY = dict(every_n_steps=1, max_tokens=32, layer_jacobian=False, subspace_rank=2, dtype="float32")
CURVATURE = dict(every_n_steps=1, eigen_max_iter=4, trace_max_samples=2, density=False)
STEPS = 2


def curvature_batch(rank: int) -> dict[str, torch.Tensor]:
    """Each rank's own rows: the probe measures on rank zero's, on every rank."""
    rows = TOKENS[4 * rank : 4 * rank + 4]
    return {"input_ids": rows, "labels": rows}


class Rows(Dataset):
    def __len__(self) -> int:
        return len(TOKENS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": TOKENS[i], "labels": TOKENS[i]}


class Record(transformers.TrainerCallback):
    """The weights at the start of each step and the batch each step trained on (its training forward with labels)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._batch, with_kwargs=True)

    def _batch(self, module, args, kwargs):
        if module.training and kwargs.get("labels") is not None:  # not the curvature's forwards, in eval mode
            self.batches.append(kwargs["input_ids"].clone())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = copy.deepcopy(model.state_dict())


def train(out_dir: Path, monitors: bool) -> tuple[transformers.Trainer, Record]:
    model = tiny_hf_model("qwen3_moe", **CONFIG)
    args = sgd_training_arguments(
        out_dir / ("monitored" if monitors else "plain"), batch_size=2, ddp_backend="gloo", max_steps=STEPS
    )
    record = Record(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[record])
    if monitors:
        probe_data = DataLoader(TensorDataset(PROBE), batch_size=4)  # the same on every rank
        probes = GeometryProbe(**GEOMETRY), RouterProbe(every_n_steps=1), probe_data, CurvatureProbe(**CURVATURE)
        add_monitors(trainer, *probes, curvature_data=curvature_batch(dist.get_rank()))
    trainer.train()
    return trainer, record


def main(out_dir: str) -> None:
    monitored, record = train(Path(out_dir), monitors=True)
    plain, _ = train(Path(out_dir), monitors=False)
    result = {
        "world_size": dist.get_world_size(),
        "log_history": monitored.state.log_history,
        "batches": record.batches,
        "weights": record.weights,
        "final": monitored.model.state_dict(),
        "final_without_monitors": plain.model.state_dict(),
    }
    torch.save(result, Path(out_dir) / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
