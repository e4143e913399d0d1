"""The configuration of one MoE feed-forward layer, :class:`MoEConfig`, and the values each of its choices takes.

Routing (docs/geometry.md, Notation):
- ``"topk"``: softmax over all E logits, keep the k largest, optionally renormalise them over those k (Mixtral);
- ``"soft"``: every expert weighted by its softmax probability;
- ``"dense"``: a single FFN with no router (:class:`~moe_lightning.nn.layer.DenseFFN`), one expert with gate 1.

Scoring ``"sigmoid"`` (DeepSeek-V3) replaces the softmax by per-expert sigmoids; an aux-free ``expert_bias`` is
added to the scores for selection only; ``num_shared_experts`` adds an always-on FFN to the routed output.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lightning.common import check_choice, check_nonnegative, check_positive
from moe_lightning.common.choices import ROUTINGS

__all__ = ["ACTIVATIONS", "CAPACITY_MATCHES", "DISPATCHES", "LOAD_BALANCINGS", "SCORINGS", "MoEConfig"]

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
CAPACITY_MATCHES = ("total", "active")
DISPATCHES = ("auto", "loop", "sorted", "grouped", "bmm")
SCORINGS = ("softmax", "sigmoid")
LOAD_BALANCINGS = ("aux_loss", "global_aux_loss", "sequence_aux_loss", "aux_free", "none")


@dataclass
class MoEConfig:
    """One MoE feed-forward layer. Validated once, in ``__post_init__``."""

    dim: int = 64
    """Model (token) dimension D."""
    expert_hidden: int = 128
    """Hidden width H of each expert."""
    num_experts: int = 8
    """Number of experts E (ignored by ``routing="dense"`` except for capacity matching)."""
    top_k: int = 2
    """Experts per token for ``routing="topk"``; for the dense baseline it sets the ``"active"`` capacity match."""
    routing: str = "topk"
    """One of ``"dense"``, ``"topk"``, ``"soft"``."""
    activation: str = "gelu"
    """Expert nonlinearity: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"swiglu"``."""
    normalize_topk: bool = True
    """Renormalise the kept top-k probabilities to sum to 1 (Mixtral). False keeps the raw softmax values."""
    capacity_match: str = "total"
    """Dense baseline width: ``"total"`` gives E*H (equal total parameters), ``"active"`` gives k*H (equal FLOPs)."""
    capacity_factor: float | None = None
    """Expert capacity ``ceil(capacity_factor * N * k / E)`` tokens; overflow is dropped. None is dropless."""
    jitter_noise: float = 0.0
    """Multiplicative router input jitter ``U(1 - eps, 1 + eps)`` during training (Switch Transformer)."""
    dispatch: str = "auto"
    """Expert dispatch: ``"loop"``, ``"sorted"``, ``"grouped"`` (grouped_mm), ``"bmm"`` (soft only), or
    ``"auto"`` (``"bmm"`` for soft routing; otherwise ``"grouped"`` on CUDA and ``"sorted"`` on CPU, where
    plain per-expert matmuls beat ``grouped_mm``; see docs/benchmarks/dispatch.md)."""
    scoring: str = "softmax"
    """Router scores: ``"softmax"`` over the E logits, or ``"sigmoid"`` of each logit (DeepSeek-V3; top-k only)."""
    num_shared_experts: int = 0
    """Always-on shared experts added to the routed output (DeepSeek-V3), built as one FFN of width
    ``num_shared_experts * shared_expert_hidden``."""
    shared_expert_hidden: int | None = None
    """Hidden width of each shared expert; None uses ``expert_hidden``."""
    load_balancing: str = "aux_loss"
    """``"aux_loss"`` (Switch loss), ``"global_aux_loss"`` (the Switch loss of the loads summed over the
    data-parallel ranks, one small all_reduce per layer and training forward), ``"sequence_aux_loss"``
    (DeepSeek-V3's per-sequence loss), ``"aux_free"`` (a per-expert selection bias, updated once per optimiser
    step) or ``"none"``; the last three need top-k."""
    bias_update_rate: float = 1e-3
    """Aux-free bias step per optimiser step (DeepSeek-V3's gamma)."""
    routed_scaling: float = 1.0
    """Scale on the routed experts' gates, hence on the routed output (DeepSeek-V3's routed_scaling_factor)."""

    def __post_init__(self) -> None:
        check_choice("routing", self.routing, ROUTINGS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("capacity_match", self.capacity_match, CAPACITY_MATCHES)
        check_choice("dispatch", self.dispatch, DISPATCHES)
        for field in ("dim", "expert_hidden", "num_experts"):
            check_positive(field, getattr(self, field))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}")
        if self.capacity_factor is not None and self.routing != "topk":
            raise ValueError(f"capacity_factor applies to routing='topk' only, got routing={self.routing!r}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1), got {self.jitter_noise!r}")
        if self.dispatch == "bmm" and self.routing != "soft":
            raise ValueError(f"dispatch='bmm' applies to routing='soft' only, got routing={self.routing!r}")
        self._check_routing_family()

    def _check_routing_family(self) -> None:
        check_choice("scoring", self.scoring, SCORINGS)
        check_choice("load_balancing", self.load_balancing, LOAD_BALANCINGS)
        if not isinstance(self.num_shared_experts, int) or isinstance(self.num_shared_experts, bool):
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        check_nonnegative("num_shared_experts", self.num_shared_experts)
        if self.shared_expert_hidden is not None:
            check_positive("shared_expert_hidden", self.shared_expert_hidden)
        check_nonnegative("bias_update_rate", self.bias_update_rate)
        check_positive("routed_scaling", self.routed_scaling)
        # The dense baseline ignores the router's fields, so one config serves every routing of a sweep.
        if self.routing == "soft" and self.scoring != "softmax":
            raise ValueError(f"scoring={self.scoring!r} applies to routing='topk' only, got routing='soft'")
        if self.routing == "soft" and self.load_balancing in ("sequence_aux_loss", "aux_free"):
            raise ValueError(
                f"load_balancing={self.load_balancing!r} applies to routing='topk' only, got routing='soft'"
            )

    @property
    def shared_hidden(self) -> int:
        """Total hidden width of the shared experts (0 without them)."""
        per_expert = self.expert_hidden if self.shared_expert_hidden is None else self.shared_expert_hidden
        return self.num_shared_experts * per_expert

    @property
    def dense_hidden(self) -> int:
        """Hidden width of the capacity-matched dense baseline, shared experts included."""
        routed = self.num_experts if self.capacity_match == "total" else self.top_k
        return routed * self.expert_hidden + self.shared_hidden

    def param_counts(self) -> dict[str, int]:
        """Total and active (per-token) parameters of one layer built from this config, router included."""
        per_hidden_unit = (3 if self.activation == "swiglu" else 2) * self.dim
        if self.routing == "dense":
            n = per_hidden_unit * self.dense_hidden
            return {"total": n, "active": n}
        router = self.dim * self.num_experts
        active_experts = self.num_experts if self.routing == "soft" else self.top_k
        shared = per_hidden_unit * self.shared_hidden
        return {
            "total": router + self.num_experts * per_hidden_unit * self.expert_hidden + shared,
            "active": router + active_experts * per_hidden_unit * self.expert_hidden + shared,
        }
