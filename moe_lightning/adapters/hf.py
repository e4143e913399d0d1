"""Adapters for the sparse MoE blocks of Hugging Face ``transformers``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, and the
registration of the experts-interface adapter (:mod:`moe_lightning.adapters.hf_experts`) that reads every family of
transformers 5, these four included, and is matched first.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``H`` expert hidden.

``transformers`` is an optional extra, so this module never imports it: blocks are matched by class name and
attributes. Two weight layouts are understood:

- transformers >= 5 (tested with 5.23.0): ``block.gate`` is a ``*TopKRouter`` holding ``weight`` (E, D), ``top_k``
  and (Qwen, OLMoE) ``norm_topk_prob``; ``block.experts`` holds fused 3-D parameters ``gate_up_proj`` (E, 2H, D)
  and ``down_proj`` (E, D, H) and one ``act_fn``. The block returns only the hidden states.
- transformers 4.x: ``block.gate`` is an ``nn.Linear``; ``block.experts`` is an ``nn.ModuleList`` of SwiGLU MLPs
  (Mixtral ``w1``/``w3``/``w2``, the others ``gate_proj``/``up_proj``/``down_proj``); ``top_k`` and
  ``norm_topk_prob`` live on the block, which returns ``(hidden_states, router_logits)``.

Every expert is ``f_e(x) = W_down (act(W_gate x) * (W_up x))`` and the block computes
``y = Σ_e g_e(x) f_e(x)`` with ``g = scatter(topk(softmax(W_router x)))``, renormalised over the top-k where the
model does so (Mixtral always; Qwen and OLMoE when ``norm_topk_prob``). Qwen2-MoE adds
``sigmoid(w_shared · x) f_shared(x)``, reported as a second view ``<path>.shared_expert`` with one expert, so that
the views of a block sum to its output. Router jitter noise (Mixtral, training only) is ignored: views follow eval
semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.adapters.hf_experts import ADAPTER_NAME as experts_adapter
from moe_lightning.adapters.hf_experts import experts_interface_views, is_experts_block
from moe_lightning.adapters.registry import register_adapter, registered_adapters
from moe_lightning.adapters.swiglu import SwigluClosedForms, check_expert_index, is_silu, swiglu_hidden
from moe_lightning.geometry.view import MoEView, TokenFn

# adapter name -> (block class name, whether the family always renormalises the top-k weights)
_HF_FAMILIES: dict[str, tuple[str, bool]] = {
    "hf-mixtral": ("MixtralSparseMoeBlock", True),
    "hf-qwen2-moe": ("Qwen2MoeSparseMoeBlock", False),
    "hf-qwen3-moe": ("Qwen3MoeSparseMoeBlock", False),
    "hf-olmoe": ("OlmoeSparseMoeBlock", False),
}


class _LinearLayoutSwiglu(SwigluClosedForms):
    """A view whose ``_expert_weights(e)`` gives an expert's SwiGLU weights in ``nn.Linear`` layout and its act."""

    def _expert_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor, TokenFn]:
        raise NotImplementedError

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        w_gate_HD, w_up_HD, w_down_DH, act = self._expert_weights(e)
        return (w_gate_HD.T, w_up_HD.T, w_down_DH.T) if is_silu(act) else None

    def expert_weights(self, e: int) -> dict[str, Tensor]:
        """Expert ``e``'s ``w_gate``, ``w_up`` (``(H, D)``) and ``w_out`` (``(D, H)``), views of its parameters."""
        w_gate_HD, w_up_HD, w_down_DH, _ = self._expert_weights(e)
        return {"w_gate": w_gate_HD, "w_up": w_up_HD, "w_out": w_down_DH}

    def _expert_fn(self, e: int, x_ND: Tensor) -> Tensor:
        w_gate_HD, w_up_HD, w_down_DH, act = self._expert_weights(e)
        h_NH = swiglu_hidden(x_ND, w_gate_HD, w_up_HD, act)
        return F.linear(h_NH, w_down_DH.to(h_NH.dtype))

    def _hidden_fn(self, e: int, x_ND: Tensor) -> Tensor:
        w_gate_HD, w_up_HD, _, act = self._expert_weights(e)
        return swiglu_hidden(x_ND, w_gate_HD, w_up_HD, act)

    def casts_weights_on_read(self) -> bool:
        """True: the gate's weights (the router's, or the shared expert's gate) and one expert's weights per call are
        cast to the input's dtype (:func:`~moe_lightning.adapters.swiglu.swiglu_hidden` lends an activation module
        with tensors of its own cast copies), so a probe lends the block no cast copy."""
        return True


class HFSparseMoeView(_LinearLayoutSwiglu):
    """:class:`MoEView` of the routed experts of one Hugging Face sparse MoE block.

    Weights are read from the block at every call, so the view follows training, and cast to the input's dtype
    (:class:`~moe_lightning.geometry.view.CastsOnRead`).

    Args:
        name: module path of the block in the model.
        module: the sparse MoE block (``MixtralSparseMoeBlock`` and the like).
        always_normalise: renormalise the top-k weights whatever the block says (Mixtral's router does).
    """

    def __init__(self, name: str, module: nn.Module, *, always_normalise: bool = False) -> None:
        self.name = name
        self.module = module
        router = module.gate
        self.num_experts = int(router.weight.shape[0])
        # transformers >= 5 keeps top_k / norm_topk_prob on the router, 4.x on the block.
        top_k = getattr(router, "top_k", getattr(module, "top_k", None))
        if top_k is None or not 1 <= int(top_k) <= self.num_experts:
            raise ValueError(f"{name}: top_k={top_k!r} is invalid; allowed 1..{self.num_experts}")
        self.top_k = int(top_k)
        self.norm_topk_prob = bool(
            always_normalise or getattr(router, "norm_topk_prob", getattr(module, "norm_topk_prob", False))
        )
        experts = module.experts
        if isinstance(experts, nn.ModuleList):
            num_stored = len(experts)
        else:
            for flag, supported in (("has_bias", False), ("has_gate", True), ("has_post_expert_norm", False)):
                if getattr(experts, flag, supported) != supported:
                    raise ValueError(
                        f"{name}: experts.{flag}={getattr(experts, flag)!r} is not supported; allowed {supported}"
                    )
            if not getattr(experts, "is_concatenated", True):
                raise ValueError(
                    f"{name}: experts.is_concatenated=False (interleaved gate/up) is not supported; allowed True"
                )
            num_stored = int(experts.gate_up_proj.shape[0])
        if num_stored != self.num_experts:
            raise ValueError(
                f"{name}: the block stores {num_stored} experts but its router scores "
                f"{self.num_experts}; they must agree"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"norm_topk_prob={self.norm_topk_prob})"
        )

    def gates(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (N, E): the block's routing weights, 0 where a token is not routed.

        Pure and vmap-friendly (out-of-place ``scatter``, no data-dependent control flow), so ``torch.func``
        can differentiate through it. Softmax, top-k and renormalisation run in float32 whatever the input dtype,
        exactly as every HF router does (``softmax(logits.float())`` / ``softmax(..., dtype=torch.float)``), so
        the gates equal the model's own in float64 too (and the layer map is the model's, float32 routing included).
        """
        router = self.module.gate
        bias = getattr(router, "bias", None)
        logits_NE = F.linear(x_ND, router.weight.to(x_ND.dtype), None if bias is None else bias.to(x_ND.dtype))
        probs_NE = logits_NE.float().softmax(dim=-1)
        top_weights_NK, top_index_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights_NK = top_weights_NK / top_weights_NK.sum(dim=-1, keepdim=True)
        gates_NE = torch.zeros_like(probs_NE).scatter(-1, top_index_NK, top_weights_NK)
        return gates_NE.to(x_ND.dtype)

    def _expert_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor, TokenFn]:
        """Expert ``e`` in ``nn.Linear`` layout: ``(W_gate (H, D), W_up (H, D), W_down (D, H), act)``."""
        check_expert_index(self.name, e, self.num_experts)
        experts = self.module.experts
        if isinstance(experts, nn.ModuleList):  # transformers 4.x: one MLP module per expert
            mlp = experts[e]
            if hasattr(mlp, "w1"):  # Mixtral names: w1 gate, w3 up, w2 down
                return mlp.w1.weight, mlp.w3.weight, mlp.w2.weight, mlp.act_fn
            return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.act_fn
        gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]  # (2H, D), (D, H)
        if getattr(experts, "is_transposed", False):  # stored (D, 2H), (H, D) for grouped_mm kernels
            gate_up, down = gate_up.T, down.T
        # Same split as the HF forward: linear(x, gate_up_proj[e]).chunk(2, dim=-1) -> (gate, up).
        w_gate_HD, w_up_HD = gate_up.chunk(2, dim=0)
        return w_gate_HD, w_up_HD, down, experts.act_fn

    def expert(self, e: int) -> TokenFn:
        """Expert ``e`` as a function (N, D) -> (N, D), without its gate weight."""
        check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._expert_fn(e, x_ND)

    def expert_hidden(self, e: int) -> TokenFn:
        """Expert ``e``'s inner activation ``act(x W_gate^T) * (x W_up^T)``, (N, D) -> (N, H)."""
        check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._hidden_fn(e, x_ND)


class HFSharedExpertView(_LinearLayoutSwiglu):
    """:class:`MoEView` of Qwen2-MoE's always-on shared expert: one expert gated by ``sigmoid(w · x)``.

    ``module`` is the whole sparse block (not the shared MLP), because the shared expert and its gate read the
    block's input, and hooks on ``module`` capture exactly that input.

    Args:
        name: view name, ``"<block path>.shared_expert"``.
        module: the ``Qwen2MoeSparseMoeBlock``.
    """

    num_experts = 1

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_experts=1)"

    def gates(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (N, 1): ``sigmoid(shared_expert_gate(x))``, as in ``Qwen2MoeSparseMoeBlock.forward``."""
        gate = self.module.shared_expert_gate
        bias = None if gate.bias is None else gate.bias.to(x_ND.dtype)
        return torch.sigmoid(F.linear(x_ND, gate.weight.to(x_ND.dtype), bias))

    def _expert_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor, TokenFn]:
        check_expert_index(self.name, e, 1)
        mlp = self.module.shared_expert
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.act_fn

    def expert(self, e: int) -> TokenFn:
        """The shared MLP as a function (N, D) -> (N, D); ``e`` must be 0."""
        check_expert_index(self.name, e, 1)
        return lambda x_ND: self._expert_fn(0, x_ND)

    def expert_hidden(self, e: int) -> TokenFn:
        """The shared MLP's inner activation, (N, D) -> (N, H); ``e`` must be 0."""
        check_expert_index(self.name, e, 1)
        return lambda x_ND: self._hidden_fn(0, x_ND)


def _matcher(class_name: str):
    def match(module: nn.Module) -> bool:
        return type(module).__name__ == class_name and hasattr(module, "gate") and hasattr(module, "experts")

    return match


def _factory(always_normalise: bool):
    def factory(path: str, module: nn.Module) -> list[MoEView]:
        views: list[MoEView] = [HFSparseMoeView(path, module, always_normalise=always_normalise)]
        if hasattr(module, "shared_expert") and hasattr(module, "shared_expert_gate"):
            views.append(HFSharedExpertView(f"{path}.shared_expert" if path else "shared_expert", module))
        return views

    return factory


def register_hf_adapters() -> None:
    """Register the Hugging Face adapters with :func:`find_moe_layers`; calling it again does nothing.

    Adds ``hf-experts`` (every block of the transformers experts interface, :mod:`moe_lightning.adapters.hf_experts`)
    and then ``hf-mixtral``, ``hf-qwen2-moe``, ``hf-qwen3-moe`` and ``hf-olmoe`` (which, with the experts interface
    taken first, read the transformers 4.x layout of those families) after the adapters already registered. Does not
    import ``transformers``.
    """
    present = set(registered_adapters())
    if experts_adapter not in present:
        register_adapter(experts_adapter, is_experts_block, experts_interface_views)
    for adapter_name, (class_name, always_normalise) in _HF_FAMILIES.items():
        if adapter_name not in present:
            register_adapter(adapter_name, _matcher(class_name), _factory(always_normalise))
