"""The LightningModules: thin wrappers of a raw ``nn.Module`` that add the task loss, the weighted auxiliary losses
and the AdamW optimiser with its learning-rate schedule (as in litgpt), so tests and callbacks can use
``module.model``.

The arguments both modules share, the fields of :class:`LossWeights` and :class:`OptimizerConfig`, are written
once: as the ``__init__`` signature of a base class that :func:`_shared_arguments` makes from a module's optimiser
defaults; each module forwards them as ``**kwargs``. They stay flat keyword arguments because configs, command
lines and checkpoints spell them flat (``model.init_args.lr``, ``--model.lr``, ``hparams["lr"]``); a nested
``OptimizerConfig`` argument would change all three. They are a signature, rather than fields of a dataclass that
each module fills from its ``**kwargs``, because LightningCLI (jsonargparse) follows ``**kwargs`` into
``super().__init__`` and shows that signature's defaults, which differ per module (:data:`MLP_OPTIMIZER`,
:data:`CAUSAL_LM_OPTIMIZER`), and Lightning's ``save_hyperparameters()`` saves the arguments of every ``__init__``
on the call stack, defaults included; from a dataclass filled from ``**kwargs`` the help would show no defaults
and the checkpoint would hold only the arguments given.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from moe_lightning.common import check_choice, check_nonnegative, check_positive
from moe_lightning.distributed.layout import clip_grad_norm_, expert_parallel_mesh, is_parallelized, parallelize
from moe_lightning.nn.balancing import update_expert_biases
from moe_lightning.nn.models import (
    MLPMoE,
    MLPMoEConfig,
    ModelOutput,
    TransformerMoE,
    TransformerMoEConfig,
    param_counts,
)

LR_SCHEDULES = ("constant", "cosine", "linear")
TASKS = ("regression", "classification")


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimiser and its schedule, shared by every LightningModule here: AdamW with a linear warm-up, then a
    constant, cosine or linear decay to ``min_lr_ratio * lr``.

    The LightningModules take these fields as flat keyword arguments (``lr=3e-3``, ``--model.init_args.lr``),
    with one ``OptimizerConfig`` as each module's defaults (:data:`MLP_OPTIMIZER`, :data:`CAUSAL_LM_OPTIMIZER`),
    and save them flat as hyperparameters; :attr:`_MoEModule.optimizer_config` reads them back as one.

    Attributes:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` after warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr`` for the decaying schedules.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_nonnegative("weight_decay", self.weight_decay)
        check_nonnegative("warmup_steps", self.warmup_steps)
        check_positive("lr", self.lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The learning rate at optimiser step ``step`` of ``total_steps``, as a fraction of ``lr``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(total_steps - self.warmup_steps, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


@dataclass(frozen=True)
class LossWeights:
    """The weights of the router's auxiliary losses in the total loss,
    ``task + load_balance_coef * load_balance + z_loss_coef * z_loss``; taken, like :class:`OptimizerConfig`, as
    flat keyword arguments by every LightningModule here.

    Attributes:
        load_balance_coef: weight of the load-balancing loss (Switch Transformer uses 0.01).
        z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001).
    """

    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        check_nonnegative("load_balance_coef", self.load_balance_coef)
        check_nonnegative("z_loss_coef", self.z_loss_coef)


LOSS_WEIGHTS = LossWeights()
MLP_OPTIMIZER = OptimizerConfig()
CAUSAL_LM_OPTIMIZER = OptimizerConfig(lr=3e-4, weight_decay=0.1, warmup_steps=100, lr_schedule="cosine")


class _MoEModule(L.LightningModule):
    """Shared loss and optimiser logic. A subclass derives from :func:`_shared_arguments` of its optimiser
    defaults, builds ``self.model`` and defines ``task_loss``."""

    @property
    def loss_weights(self) -> LossWeights:
        """The auxiliary-loss weights as the hyperparameters hold them now."""
        return LossWeights(**{f.name: self.hparams[f.name] for f in fields(LossWeights)})

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """The optimiser fields as the hyperparameters hold them now (a tuner may have changed ``hparams.lr``)."""
        return OptimizerConfig(**{f.name: self.hparams[f.name] for f in fields(OptimizerConfig)})

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: FSDP2 over every rank and, with
        :class:`~moe_lightning.lightning.strategy.ExpertParallelStrategy`, expert parallelism
        (:func:`~moe_lightning.distributed.layout.parallelize`). Nothing under the other strategies."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy) or is_parallelized(self.model):
            return
        mesh = getattr(strategy, "expert_mesh", None)
        if mesh is None:  # Lightning's own ModelParallelStrategy: FSDP2 alone
            if strategy.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    "ModelParallelStrategy: tensor_parallel_size must be 1 (these models have no tensor "
                    "parallelism; every rank is data-parallel); use ExpertParallelStrategy for expert parallelism"
                )
            mesh = expert_parallel_mesh(strategy.root_device.type, 1)
        parallelize(self.model, mesh)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except clipping by norm once :meth:`configure_model` has sharded the model, where
        the experts' and the other weights' gradients live on two device meshes (:func:`clip_grad_norm_`)."""
        if not gradient_clip_val or gradient_clip_algorithm == "value" or not is_parallelized(self.model):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_grad_norm_(self.model.parameters(), gradient_clip_val)

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is not None:  # a resumed fit: the start it continues logged the counts at step 0
            return
        counts = param_counts(self.model)
        for logger in self.loggers:
            logger.log_metrics({"params/total": counts["total"], "params/active": counts["active"]}, step=0)

    def forward(self, x: Tensor) -> ModelOutput:
        return self.model(x)

    def loss(self, batch: tuple[Tensor, Tensor], stage: str = "probe") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(total loss, task loss, aux losses)`` of a batch; logs nothing unless ``stage`` is a real stage.

        The total is ``task + load_balance_coef * load_balance + z_loss_coef * z_loss``. Callbacks (e.g.
        ``CurvatureMonitor``) call it with the default ``stage="probe"``.
        """
        x, y = batch
        out = self.model(x)
        if stage == "train":  # the aux-free bias steps from the training batches' loads only, never a probe's
            for layer_aux in out.aux:
                layer_aux.record_load()
        task_loss = self.task_loss(out.output, y, stage)
        aux = out.aux_losses()
        weights = self.loss_weights
        total = task_loss + weights.load_balance_coef * aux["load_balance"] + weights.z_loss_coef * aux["z_loss"]
        return total, task_loss, aux

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        loss, task_loss, aux = self.loss(batch, stage)
        batch_size = x.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=stage != "train")
        self.log(f"{stage}/task_loss", task_loss, batch_size=batch_size, sync_dist=stage != "train")
        self.log(f"{stage}/aux_load_balance", aux["load_balance"], batch_size=batch_size, sync_dist=stage != "train")
        self.log(f"{stage}/aux_z_loss", aux["z_loss"], batch_size=batch_size, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then one aux-free bias step per biased router from the loads of every micro-batch
        of this step (the last one's forward runs inside the step's closure), summed over data-parallel ranks."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        update_expert_biases(self.model, reduce=self._sum_over_ranks)

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def configure_optimizers(self):
        """AdamW with linear warm-up, then a constant, cosine or linear decay (:class:`OptimizerConfig`).

        LightningCLI's ``--optimizer`` / ``--lr_scheduler`` flags replace this for any other choice.
        """
        config = self.optimizer_config
        optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _shared_arguments(optimizer: OptimizerConfig) -> type[_MoEModule]:
    """The base class of a LightningModule whose optimiser defaults are ``optimizer``: its ``__init__`` takes the
    fields of :class:`LossWeights` and :class:`OptimizerConfig` as flat keyword arguments, checks them, and saves
    them with the subclass's own arguments as the hyperparameters. One class per set of defaults, because a
    signature's defaults are fixed when it is written (the module docstring says why a signature at all)."""

    class SharedArguments(_MoEModule):
        def __init__(
            self,
            load_balance_coef: float = LOSS_WEIGHTS.load_balance_coef,
            z_loss_coef: float = LOSS_WEIGHTS.z_loss_coef,
            lr: float = optimizer.lr,
            weight_decay: float = optimizer.weight_decay,
            warmup_steps: int = optimizer.warmup_steps,
            lr_schedule: str = optimizer.lr_schedule,
            min_lr_ratio: float = optimizer.min_lr_ratio,
        ) -> None:
            LossWeights(load_balance_coef, z_loss_coef)  # checks the values
            OptimizerConfig(lr, weight_decay, warmup_steps, lr_schedule, min_lr_ratio)
            super().__init__()
            # Lightning collects the arguments of every __init__ on the stack: these and the subclass's own.
            self.save_hyperparameters()

    # LightningCLI's help for the flat arguments: the Attributes of the two dataclasses, as an Args section.
    entries = [
        inspect.cleandoc(config.__doc__ or "").split("Attributes:\n", 1)[-1]
        for config in (LossWeights, OptimizerConfig)
    ]
    SharedArguments.__doc__ = "The arguments every LightningModule here shares.\n\nArgs:\n" + "\n".join(entries)
    return SharedArguments


class MLPMoEModule(_shared_arguments(MLP_OPTIMIZER)):
    """Regression (MSE) or classification (cross-entropy) with an :class:`MLPMoE`.

    Args:
        config: the network (routing, experts, sizes).
        task: ``"regression"`` or ``"classification"``; must match the data.
        **kwargs: the arguments every LightningModule here shares, flat: ``load_balance_coef`` and ``z_loss_coef``
            (the fields of :class:`LossWeights`) and ``lr``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``
            and ``min_lr_ratio`` (the fields of :class:`OptimizerConfig`), with this module's defaults,
            :data:`MLP_OPTIMIZER`.
    """

    def __init__(self, config: MLPMoEConfig | None = None, task: str = "regression", **kwargs: Any) -> None:
        check_choice("task", task, TASKS)
        config = config if config is not None else MLPMoEConfig()  # before super(), which saves it
        super().__init__(**kwargs)
        self.model = MLPMoE(config)
        if task == "classification":
            self.accuracy = MulticlassAccuracy(num_classes=config.output_dim, average="micro")

    def task_loss(self, prediction: Tensor, target: Tensor, stage: str) -> Tensor:
        if self.hparams.task == "regression":
            return F.mse_loss(prediction.float(), target.float())
        loss = F.cross_entropy(prediction.float(), target)
        if stage in ("val", "test"):
            self.accuracy(prediction, target)
            self.log(f"{stage}/acc", self.accuracy, batch_size=target.shape[0])
        return loss


class CausalLMModule(_shared_arguments(CAUSAL_LM_OPTIMIZER)):
    """Next-token prediction with a :class:`TransformerMoE`; logs loss and perplexity.

    Args:
        config: the network (routing, experts, sizes, vocabulary).
        **kwargs: the arguments every LightningModule here shares, flat: ``load_balance_coef`` and ``z_loss_coef``
            (the fields of :class:`LossWeights`) and ``lr``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``
            and ``min_lr_ratio`` (the fields of :class:`OptimizerConfig`), with this module's defaults,
            :data:`CAUSAL_LM_OPTIMIZER`.
    """

    def __init__(self, config: TransformerMoEConfig | None = None, **kwargs: Any) -> None:
        config = config if config is not None else TransformerMoEConfig()  # before super(), which saves it
        super().__init__(**kwargs)
        self.model = TransformerMoE(config)
        self.perplexity = Perplexity()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.model.config.vocab_size:
            raise ValueError(
                f"model config.vocab_size={self.model.config.vocab_size} is smaller than the data's "
                f"vocab_size={data_vocab}; set model.init_args.config.vocab_size >= {data_vocab}"
            )

    def task_loss(self, logits_BTV: Tensor, targets_BT: Tensor, stage: str) -> Tensor:
        loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
        if stage in ("val", "test"):
            self.perplexity(logits_BTV.float(), targets_BT)
            self.log(f"{stage}/ppl", self.perplexity, batch_size=targets_BT.shape[0])
        elif stage == "train":
            self.log("train/ppl", loss.detach().exp(), batch_size=targets_BT.shape[0])
        return loss
