"""Mixture-of-Experts layers in pure PyTorch: Router -> experts -> MoELayer, and the DenseFFN baseline.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``H`` expert hidden
width, ``A = N * K`` token-expert assignments.

Routing (docs/geometry.md, Notation):
- ``"topk"``: softmax over all E logits, keep the k largest, optionally renormalise them over those k (Mixtral);
- ``"soft"``: every expert weighted by its softmax probability;
- ``"dense"``: a single FFN with no router (:class:`DenseFFN`), treated as one expert with gate 1.

Scoring ``"sigmoid"`` (DeepSeek-V3) replaces the softmax by per-expert sigmoids; an aux-free ``expert_bias`` is
added to the scores for selection only; ``num_shared_experts`` adds an always-on FFN to the routed output.

Expert weights are stacked: ``w_in`` is ``(E, D, H)`` (``(E, D, 2H)`` for SwiGLU: gate then up projection) and
``w_out`` is ``(E, H, D)``. That is the layout ``torch.nn.functional.grouped_mm`` takes as its second operand,
so the grouped path needs no per-step transpose.

Expert parallelism (:meth:`MoELayer.shard_experts`): over a device mesh of P ranks, each rank holds ``E / P``
experts as the local shard of a ``DTensor`` (``Shard(0)``), and the assignments travel to their experts' ranks and
back with ``all_to_all_single`` (:mod:`moe_lightning.distributed.expert_parallel`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.common import check_choice, check_nonnegative, check_positive, is_fsdp_module, warn_once
from moe_lightning.common.choices import ROUTINGS
from moe_lightning.distributed.expert_parallel import plan_exchange
from moe_lightning.nn.balancing import load_balance_loss, router_z_loss, sequence_load_balance_loss

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
CAPACITY_MATCHES = ("total", "active")
DISPATCHES = ("auto", "loop", "sorted", "grouped", "bmm")
SCORINGS = ("softmax", "sigmoid")
LOAD_BALANCINGS = ("aux_loss", "sequence_aux_loss", "aux_free", "none")


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
    """``"aux_loss"`` (Switch loss), ``"sequence_aux_loss"`` (DeepSeek-V3's per-sequence loss), ``"aux_free"``
    (a per-expert selection bias, updated once per optimiser step) or ``"none"``; the last three need top-k."""
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


@dataclass
class RouterOutput:
    """What the router decided for a batch of tokens."""

    logits: Tensor  # (N, E) raw router logits
    probs: Tensor  # (N, E) softmax over all experts; for sigmoid scoring the sigmoids normalised to sum 1
    gates: Tensor  # (N, E) gate weights, 0 where a token is not routed
    expert_index: Tensor  # (N, K) chosen experts (all E for soft routing)
    expert_weight: Tensor  # (N, K) their gate weights


@dataclass
class MoEAux:
    """Auxiliary losses and router statistics of one MoE layer's forward pass."""

    load_balance: Tensor  # scalar, 1.0 at perfect balance (Switch or DeepSeek-V3 sequence loss; 0 without one)
    z_loss: Tensor  # scalar (ST-MoE eq. 5)
    tokens_per_expert: Tensor  # (E,) routed assignments per expert, after capacity dropping, detached
    dropped: Tensor  # scalar int, assignments dropped by the capacity limit
    router: RouterOutput
    routed_per_expert: Tensor | None = None  # (E,) the router's decisions before dropping (top-k), detached
    source: Router | None = None  # the router, where it keeps an aux-free bias to update from these loads

    def record_load(self) -> None:
        """Add this pass's loads to the aux-free router's pending loads (a training step calls this)."""
        if self.source is not None and self.routed_per_expert is not None:
            self.source.record_load(self.routed_per_expert)


def _softmax(logits: Tensor) -> Tensor:
    # Routing probabilities in at least float32, also under bf16 autocast (ST-MoE, "selective precision").
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _scores(logits_NE: Tensor, scoring: str) -> tuple[Tensor, Tensor]:
    """``(scores, probs)``: the gate values before top-k, and the distribution over experts the losses use."""
    if scoring == "softmax":
        probs_NE = _softmax(logits_NE)
        return probs_NE, probs_NE
    scores_NE = torch.sigmoid(logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)))
    return scores_NE, scores_NE / scores_NE.sum(dim=-1, keepdim=True)


def topk_gates(
    probs_NE: Tensor, top_k: int, normalize: bool = True, bias_E: Tensor | None = None, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k gating: keep the k largest scores, optionally renormalised over those k, times ``scale``.

    With ``bias_E`` (aux-free balancing) the k experts are those with the largest ``score + bias``, and their
    weights are still the scores: the bias changes which experts are selected, never their weights.

    Returns:
        ``(gates_NE, index_NK, weight_NK)``; ``gates_NE`` is zero outside the chosen experts. Pure and
        vmap-friendly, so geometry code can differentiate through it.
    """
    if bias_E is None:
        weight_NK, index_NK = probs_NE.topk(top_k, dim=-1)
    else:
        index_NK = (probs_NE.detach() + bias_E.to(probs_NE.dtype)).topk(top_k, dim=-1).indices
        weight_NK = probs_NE.gather(-1, index_NK)
    if normalize:
        weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weight_NK = weight_NK * scale
    gates_NE = torch.zeros_like(probs_NE).scatter(-1, index_NK, weight_NK)
    return gates_NE, index_NK, weight_NK


class Router(nn.Module):
    """Linear router ``logits = x W_r`` with softmax or sigmoid scores and top-k or soft gating.

    With ``load_balancing="aux_free"`` it keeps a per-expert selection bias, a buffer (saved in
    checkpoints, no gradient), and the loads of the training passes since the last bias step in ``pending_load``
    (a plain attribute, so DDP's buffer broadcast cannot overwrite a rank's own loads).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        check_choice("routing", config.routing, ("topk", "soft"))
        self.num_experts, self.top_k, self.routing = config.num_experts, config.top_k, config.routing
        self.normalize_topk, self.jitter_noise = config.normalize_topk, config.jitter_noise
        self.scoring, self.routed_scaling = config.scoring, config.routed_scaling
        self.bias_update_rate = config.bias_update_rate
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.dim))  # (E, D)
        nn.init.normal_(self.weight, std=config.dim**-0.5)
        aux_free = config.load_balancing == "aux_free"
        self.register_buffer("expert_bias", torch.zeros(config.num_experts) if aux_free else None)  # (E,) float32
        self.pending_load: Tensor | None = None  # (E,) int64

    def record_load(self, load_E: Tensor) -> None:
        """Add one training pass's per-expert assignment counts to the loads of the current optimiser step."""
        load_E = load_E.detach().long()
        self.pending_load = load_E.clone() if self.pending_load is None else self.pending_load + load_E

    def _gate(self, logits_NE: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(probs, gates, index, weight)`` of the logits."""
        scores_NE, probs_NE = _scores(logits_NE, self.scoring)
        if self.routing == "soft":
            gates_NE = scores_NE * self.routed_scaling if self.routed_scaling != 1.0 else scores_NE
            index_NK = torch.arange(self.num_experts, device=logits_NE.device).expand(logits_NE.shape[0], -1)
            return probs_NE, gates_NE, index_NK, gates_NE
        gates_NE, index_NK, weight_NK = topk_gates(
            scores_NE, self.top_k, self.normalize_topk, self.expert_bias, self.routed_scaling
        )
        return probs_NE, gates_NE, index_NK, weight_NK

    def forward(self, x_ND: Tensor) -> RouterOutput:
        if self.training and self.jitter_noise > 0:
            # Switch Transformer: multiplicative jitter on the router input only.
            eps = self.jitter_noise
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - eps, 1.0 + eps)
        logits_NE = F.linear(x_ND, self.weight)
        return RouterOutput(logits_NE, *self._gate(logits_NE))

    def gates(self, x_ND: Tensor) -> Tensor:
        """Deterministic (no jitter) gate weights (N, E): a pure function of x, for the geometry probes."""
        return self._gate(F.linear(x_ND, self.weight.to(x_ND.dtype)))[1]


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)


def _grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    # grouped_mm takes float32/bf16/fp16 on CPU and CUDA, with 16-byte aligned strides.
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all((s * x.element_size()) % 16 == 0 for s in (x.shape[-1], w.shape[-1]))


# Messages of dispatch fallbacks already warned about: a fallback runs on every forward pass.
_warned_fallback: set[str] = set()


def auto_sparse_dispatch(device: torch.device) -> str:
    """The sparse dispatch ``dispatch="auto"`` uses on ``device``: ``grouped_mm`` on CUDA, the sorted per-expert
    matmuls on CPU, where they beat ``grouped_mm`` (docs/benchmarks/dispatch.md)."""
    return "grouped" if device.type == "cuda" else "sorted"


class MoELayer(nn.Module):
    """A bank of E expert MLPs behind a top-k or soft router.

    ``forward`` takes ``(..., D)`` and returns ``(output (..., D), MoEAux)``.

    Example:
        >>> layer = MoELayer(MoEConfig(dim=16, expert_hidden=32, num_experts=4, top_k=2))
        >>> y, aux = layer(torch.randn(2, 5, 16))
        >>> y.shape, aux.tokens_per_expert.sum().item()
        (torch.Size([2, 5, 16]), 20)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if config.routing == "dense":
            raise ValueError("MoELayer needs routing='topk' or 'soft'; use DenseFFN (or build_ffn) for 'dense'")
        self.config = config
        E, D, H = config.num_experts, config.dim, config.expert_hidden
        width_in = 2 * H if config.activation == "swiglu" else H
        self.router = Router(config)
        self.w_in = nn.Parameter(torch.empty(E, D, width_in))  # (E, D, H) or (E, D, 2H) for SwiGLU
        self.w_out = nn.Parameter(torch.empty(E, H, D))  # (E, H, D)
        nn.init.normal_(self.w_in, std=D**-0.5)
        nn.init.normal_(self.w_out, std=H**-0.5)
        # Built after the routed experts, so a config without shared experts draws today's initial weights.
        self.shared_experts = DenseFFN(config, hidden=config.shared_hidden) if config.num_shared_experts else None
        # Expert parallelism (shard_experts): the group holding the experts, and where routed loads are summed.
        self.expert_group: dist.ProcessGroup | None = None
        self.load_group: dist.ProcessGroup | None = None
        self._all_weights: tuple[Tensor, Tensor] | None = None  # every expert's weights, inside all_experts()

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    # ------------------------------------------------------------------ expert parallelism
    def shard_experts(self, mesh) -> None:
        """Expert parallelism over the 1-D ``DeviceMesh`` ``mesh`` of P ranks: rank r keeps experts
        ``[r E/P, (r+1) E/P)`` as the local shard of ``DTensor`` weights (``Shard(0)``); every rank keeps the router.

        Each rank routes its own tokens; the assignments go to their experts' ranks and come back with
        ``all_to_all_single`` (dropless, uneven splits), forward and backward. The balance loss then uses the loads
        summed over ``mesh`` (:attr:`load_group`, which a caller may widen to every data-parallel rank), so the mean
        of the ranks' losses is the loss of their tokens together. A capacity limit applies to each rank's tokens.

        The expert gradients a backward pass leaves are sums over the group's ranks of each rank's loss, as for any
        parameter before the data-parallel mean; FSDP2
        (:func:`moe_lightning.distributed.parallelize.parallelize`) divides them.
        """
        from torch.distributed.tensor import Shard, distribute_tensor

        size = mesh.size()
        if mesh.ndim != 1:
            raise ValueError(f"shard_experts: mesh must be 1-D (the expert-parallel ranks), got {mesh.ndim} dims")
        if self.num_experts % size:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by the expert-parallel size {size} "
                f"(allowed sizes: divisors of {self.num_experts})"
            )
        if self.config.dispatch == "bmm":
            raise ValueError(
                "dispatch='bmm' runs every expert on every token and cannot shard the experts; use 'auto', "
                "'sorted', 'grouped' or 'loop' under expert parallelism"
            )
        for name in ("w_in", "w_out"):
            weight = getattr(self, name)
            setattr(self, name, nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)])))
        self.expert_group = mesh.get_group()
        if self.load_group is None:
            self.load_group = self.expert_group

    @property
    def expert_parallel_size(self) -> int:
        """P, the ranks the experts are split over (1 without expert parallelism)."""
        return 1 if self.expert_group is None else dist.get_world_size(self.expert_group)

    @contextmanager
    def all_experts(self) -> Iterator[None]:
        """Every expert's weights on this rank while the context lasts (``DTensor.full_tensor``, a collective every
        rank of the expert group enters), so :meth:`expert_fn` takes any expert; nothing to do without expert
        parallelism. The copies hold no gradient and are freed on exit."""
        if self.expert_group is None:
            yield
            return
        with torch.no_grad():
            self._all_weights = (self.w_in.full_tensor(), self.w_out.full_tensor())
        try:
            yield
        finally:
            self._all_weights = None

    @property
    def local_experts(self) -> range:
        """The global indices of the experts this rank holds (all E without expert parallelism, or inside
        :meth:`all_experts`)."""
        if self._all_weights is not None:
            return range(self.num_experts)
        size = self.expert_parallel_size
        per_rank = self.num_experts // size
        start = 0 if size == 1 else dist.get_rank(self.expert_group) * per_rank
        return range(start, start + per_rank)

    def local_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(w_in, w_out)`` of this rank's experts, ``(L, D, H)`` and ``(L, H, D)``, cast to ``dtype``; the
        autograd graph reaches the parameters (their local shards under expert parallelism)."""
        w_in, w_out = self.w_in, self.w_out
        if self._all_weights is not None:
            w_in, w_out = self._all_weights
        elif hasattr(w_in, "to_local"):
            w_in, w_out = w_in.to_local(), w_out.to_local()
        return w_in.to(dtype or w_in.dtype), w_out.to(dtype or w_out.dtype)

    def local_index(self, e: int) -> int:
        """Where expert ``e`` (a global index) sits among this rank's experts; a ``ValueError`` for another rank's."""
        local = self.local_experts
        if e not in local:
            raise ValueError(f"expert {e} is not on this rank, which holds experts {local.start}..{local.stop - 1}")
        return e - local.start

    # Expert e as a pure function, used by the loop path and by the geometry views; e is a global index of one of
    # this rank's experts (local_experts). Only expert e's slice is cast to the input's dtype.
    def expert_hidden_fn(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e's inner activation (N, H), after the nonlinearity."""
        w_in = self.local_weights()[0][self.local_index(e)]
        return _activate(x_ND @ w_in.to(x_ND.dtype), self.config.activation)

    def expert_fn(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e's output (N, D)."""
        w_out = self.local_weights()[1][self.local_index(e)]
        return self.expert_hidden_fn(e, x_ND) @ w_out.to(x_ND.dtype)

    def _global_load(self, load_E: Tensor) -> Tensor:
        """``load_E`` summed over :attr:`load_group` (itself without one); no gradient flows through loads."""
        if self.load_group is None:
            return load_E
        total = load_E.detach().clone()
        dist.all_reduce(total, group=self.load_group)
        return total

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"MoELayer expects inputs with last dim {self.config.dim}, got shape {tuple(x.shape)}")
        x_ND = x.reshape(-1, x.shape[-1])
        route = self.router(x_ND)
        dispatch = self.config.dispatch
        if dispatch == "auto":
            soft_bmm = self.config.routing == "soft" and self.expert_group is None
            dispatch = "bmm" if soft_bmm else auto_sparse_dispatch(x.device)
        if dispatch == "bmm":
            y_ND = self._forward_bmm(x_ND, route.gates)
            tokens_E = torch.full((self.num_experts,), x_ND.shape[0], device=x.device)
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        else:
            y_ND, tokens_E, dropped = self._forward_sparse(x_ND, route, dispatch)
        if self.shared_experts is not None:
            # Through its forward, so that FSDP2's hooks gather its weights when it is sharded on its own.
            y_ND = y_ND + self.shared_experts(x_ND)[0].to(y_ND.dtype)
        if self.config.routing == "soft":
            # Every expert sees every token, so the load of expert i is its gate mass: f_i = sg(P_i), and the
            # loss E * sum_i P_i^2 is 1 exactly when the mean gates are uniform.
            routed_E = route.probs.detach().sum(dim=0)
        else:  # f_i counts the router's decisions, before any capacity dropping
            routed_E = torch.bincount(route.expert_index.reshape(-1), minlength=self.num_experts)
        aux = MoEAux(
            load_balance=self._balance_loss(route, self._global_load(routed_E), x),
            z_loss=router_z_loss(route.logits),
            tokens_per_expert=tokens_E.detach(),
            dropped=dropped,
            router=route,
            routed_per_expert=routed_E.detach() if self.config.routing == "topk" else None,
            source=self.router if self.router.expert_bias is not None else None,
        )
        y = y_ND.reshape(x.shape)
        if y._base is not None and is_fsdp_module(self):
            # FSDP2 registers its pre-backward hook (the all-gather of the layer's weights for backward) on the
            # output, and an in-place op on a view of another tensor would drop it; an output in its own storage
            # keeps it whatever the caller does (and FSDP2 warns on every step otherwise).
            y = y.clone()
        return y, aux

    def _balance_loss(self, route: RouterOutput, routed_E: Tensor, x: Tensor) -> Tensor:
        """The auxiliary balance loss ``config.load_balancing`` asks for; a constant 0 for aux-free and none."""
        mode = self.config.load_balancing
        if mode == "aux_loss":
            return load_balance_loss(route.probs, routed_E)
        if mode == "sequence_aux_loss":
            # (..., T, D) inputs hold sequences of T tokens; a flat (N, D) batch is one sequence.
            num_sequences = route.probs.shape[0] // x.shape[-2] if x.dim() >= 3 else 1
            return sequence_load_balance_loss(route.probs, route.expert_index, num_sequences)
        return route.probs.new_zeros(())

    def _forward_bmm(self, x_ND: Tensor, gates_NE: Tensor) -> Tensor:
        """Soft routing: every expert on every token through one batched matmul per projection."""
        x_END = x_ND.unsqueeze(0).expand(self.num_experts, -1, -1)
        h_ENH = _activate(torch.bmm(x_END, self.w_in.to(x_ND.dtype)), self.config.activation)
        y_END = torch.bmm(h_ENH, self.w_out.to(h_ENH.dtype))
        return torch.einsum("end,ne->nd", y_END, gates_NE.to(y_END.dtype))

    def _assignments(self, route: RouterOutput, num_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flatten (token, expert) assignments and sort them by expert; apply the capacity limit.

        Returns ``token_A, weight_A, counts_E, dropped`` with assignments grouped by expert, in token order
        within each expert (a stable sort, so the result is deterministic).
        """
        E, K = self.num_experts, route.expert_index.shape[1]
        expert_A = route.expert_index.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        expert_A = expert_A[order_A]
        token_A = order_A.div(K, rounding_mode="floor")
        weight_A = route.expert_weight.reshape(-1)[order_A]
        counts_E = torch.bincount(expert_A, minlength=E)
        dropped = torch.zeros((), dtype=torch.long, device=expert_A.device)
        if self.config.capacity_factor is not None:
            # GShard/Switch capacity: each expert takes at most C assignments, first come (in token order).
            capacity = math.ceil(self.config.capacity_factor * num_tokens * K / E)
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A]
            keep_A = rank_A < capacity
            dropped = (~keep_A).sum()
            token_A, weight_A, expert_A = token_A[keep_A], weight_A[keep_A], expert_A[keep_A]
            counts_E = counts_E.clamp(max=capacity)
        return token_A, weight_A, counts_E, dropped

    def _forward_sparse(self, x_ND: Tensor, route: RouterOutput, dispatch: str) -> tuple[Tensor, Tensor, Tensor]:
        token_A, weight_A, counts_E, dropped = self._assignments(route, x_ND.shape[0])
        if dispatch == "grouped" and not _grouped_mm_available(x_ND, self.w_in):
            warn_once(
                f"MoELayer: dispatch='grouped' is unavailable for dtype {x_ND.dtype} / dim {self.config.dim} "
                "(torch.nn.functional.grouped_mm needs float32/bf16 and 16-byte aligned rows); using 'sorted'",
                _warned_fallback,
            )
            dispatch = "sorted"
        x_AD = x_ND[token_A]
        if self.expert_group is None:
            y_AD = self._experts(dispatch, x_AD, counts_E)
        else:  # the rows go to their experts' ranks, run there, and come back in the same order
            exchange = plan_exchange(counts_E, self.expert_group)
            y_AD = exchange.combine(self._experts(dispatch, exchange.dispatch(x_AD), exchange.local_counts))
        y_AD = y_AD * weight_A.to(y_AD.dtype).unsqueeze(-1)
        y_ND = torch.zeros(x_ND.shape[0], x_ND.shape[1], dtype=y_AD.dtype, device=x_ND.device)
        y_ND = y_ND.index_add(0, token_A, y_AD)
        return y_ND, counts_E, dropped

    def _experts(self, dispatch: str, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """This rank's experts on assignment rows grouped by expert, ``counts_E`` rows each (one per local expert)."""
        if dispatch == "loop":
            return self._experts_loop(x_AD, counts_E)
        if dispatch == "sorted":
            return self._experts_sorted(x_AD, counts_E)
        return self._experts_grouped(x_AD, counts_E)

    def _experts_loop(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """Reference path: one expert at a time, slicing the stacked weights (``W[e]``)."""
        outputs, start = [], 0
        for e, count in zip(self.local_experts, counts_E.tolist(), strict=True):
            outputs.append(self.expert_fn(e, x_AD[start : start + count]))
            start += count
        return torch.cat(outputs) if outputs else x_AD

    def _experts_sorted(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """One contiguous matmul per expert over its slice of the sorted assignments.

        The weights are unbound once, so backward stacks E gradient slices into one buffer instead of
        allocating a full-size ``(E, D, H)`` gradient per ``W[e]`` slice.
        """
        splits = counts_E.tolist()
        w_in, w_out = (w.unbind(0) for w in self.local_weights(x_AD.dtype))
        outputs = [
            _activate(chunk @ w_in[e], self.config.activation) @ w_out[e] for e, chunk in enumerate(x_AD.split(splits))
        ]
        return torch.cat(outputs)

    def _experts_grouped(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """All experts in two ``grouped_mm`` calls over the sorted assignments, int32 offsets (torchtitan)."""
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        w_in, w_out = self.local_weights(x_AD.dtype)
        h_AH = _activate(F.grouped_mm(x_AD, w_in, offs=offsets_E), self.config.activation)
        return F.grouped_mm(h_AH.contiguous(), w_out, offs=offsets_E)


class DenseFFN(nn.Module):
    """The dense baseline: one FFN with hidden width ``config.dense_hidden`` and no router.

    ``forward`` returns ``(output, None)`` so that it is interchangeable with :class:`MoELayer`.
    """

    def __init__(self, config: MoEConfig, hidden: int | None = None) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        self.hidden = config.dense_hidden if hidden is None else hidden
        check_positive("hidden", self.hidden)
        width_in = 2 * self.hidden if config.activation == "swiglu" else self.hidden
        self.w_in = nn.Parameter(torch.empty(1, D, width_in))  # stored like one expert: (1, D, H)
        self.w_out = nn.Parameter(torch.empty(1, self.hidden, D))  # (1, H, D)
        nn.init.normal_(self.w_in, std=D**-0.5)
        nn.init.normal_(self.w_out, std=self.hidden**-0.5)

    num_experts = 1

    def expert_hidden_fn(self, e: int, x_ND: Tensor) -> Tensor:
        return _activate(x_ND @ self.w_in[0].to(x_ND.dtype), self.config.activation)

    def expert_fn(self, e: int, x_ND: Tensor) -> Tensor:
        return self.expert_hidden_fn(e, x_ND) @ self.w_out[0].to(x_ND.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"DenseFFN expects inputs with last dim {self.config.dim}, got shape {tuple(x.shape)}")
        return self.expert_fn(0, x), None


def build_ffn(config: MoEConfig) -> MoELayer | DenseFFN:
    """The feed-forward block for ``config.routing``: :class:`DenseFFN` for ``"dense"``, else :class:`MoELayer`."""
    return DenseFFN(config) if config.routing == "dense" else MoELayer(config)
