"""``ExpertParallelStrategy``: Lightning's ``ModelParallelStrategy`` with every rank data-parallel and the experts of
every MoE layer split over ``expert_parallel_size`` ranks; the LightningModules' ``configure_model`` applies the
layout (:func:`moe_lightning.distributed.layout.parallelize`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from moe_lightning.distributed.layout import expert_parallel_mesh

__all__ = ["ExpertParallelStrategy"]


class ExpertParallelStrategy(ModelParallelStrategy):
    """FSDP2 over every rank, and expert parallelism over groups of ``expert_parallel_size`` ranks.

    Lightning's ``ModelParallelStrategy`` launches the processes, builds its device mesh, calls the LightningModule's
    ``configure_model`` and saves and loads distributed checkpoints (``torch.distributed.checkpoint``, one shard
    per rank, resharded on load, so a checkpoint written with one expert-parallel size resumes with another). Its
    mesh here is ``(data_parallel=W, tensor_parallel=1)``: every rank gets its own batches, as expert parallelism
    needs. This class adds the ``(W / P, P)`` expert mesh that ``configure_model`` reads.

    Args:
        expert_parallel_size: P, the ranks each MoE layer's experts are split over; 1 is FSDP2 alone, -1 the
            processes of one node. Must divide the world size and every MoE layer's ``num_experts``.
        save_distributed_checkpoint: one checkpoint shard per rank (True), or the full state on rank 0.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; None picks the device's default.
        timeout: of the process group's collectives.

    Example::

        trainer = Trainer(accelerator="cpu", devices=2, strategy=ExpertParallelStrategy(expert_parallel_size=2))
    """

    def __init__(
        self,
        expert_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if not isinstance(expert_parallel_size, int) or (expert_parallel_size < 1 and expert_parallel_size != -1):
            raise ValueError(f"expert_parallel_size must be an int >= 1 or -1 (one node), got {expert_parallel_size!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.expert_parallel_size = expert_parallel_size
        self.expert_mesh: Any = None

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        size = self.num_processes if self.expert_parallel_size == -1 else self.expert_parallel_size
        self.expert_mesh = expert_parallel_mesh(self.root_device.type, size)
