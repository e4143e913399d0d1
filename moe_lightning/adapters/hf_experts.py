"""One adapter for every Hugging Face MoE block built on the transformers experts interface.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``H`` expert hidden.

In that interface (``transformers.integrations.moe``) an *experts module* holds 3-D expert weights
(``gate_up_proj`` (E, 2H, D) or ``up_proj`` (E, H, D), and ``down_proj`` (E, D, H); transposed where
``is_transposed``; with ``*_bias`` where ``has_bias``), an ``act_fn`` and ``_apply_gate``, and the block calls it as
``experts(hidden_states, top_k_index, top_k_weights)``. A block is matched by that structure: a module with an
experts-interface child. Nothing here depends on class names, and ``transformers`` is never imported at module level.

What a block's views are made of:

- **Gates**, the model's own routing decision and weights, never a re-implementation. Where a child of the block
  (its router) called on the block's input returns exactly the ``(top_k_index, top_k_weights)`` the block hands
  its experts, the gates come from that router (``mode == "router"``). Otherwise they come from the block itself:
  its forward runs up to the experts call, which is intercepted (``mode == "block"``). Either way softmax or
  sigmoid scoring, bias-corrected and group-limited selection, renormalisation, ``routed_scaling_factor`` and
  router biases are whatever the model does, and the gates stay differentiable in ``x`` wherever the model's routing
  is. Both run the block in eval mode (no router jitter) and record no router outputs.
- **Experts**, ``f_e(x) = down_e(gate(up_e(x)))`` exactly as the interface's ``batched_mm`` kernel computes one
  expert, with the module's own ``_apply_gate`` (fused, interleaved or clamped GLUs), ``act_fn``, biases,
  transposed layouts and post-expert norm (shared, or one scale per expert where the norm takes the expert ids). A
  plain SwiGLU (default ``_apply_gate``, SiLU, no bias, no post norm) also gets the closed-form Jacobian and
  Jacobian operator; every other expert is differentiated with ``torch.func``.
- **Shared experts**, every other child of the block that maps tokens to tokens, each a one-expert view
  ``<block>.<child>``, gated by ``sigmoid(child_gate(x))`` where the block has a one-output linear gate.

A block that multiplies its experts' output by a constant has that constant (measured by the self-check, which
it must explain exactly) folded into the gates, ``ExpertsInterfaceView.output_scale``.

A **reconstruction self-check** runs when the views are built: on a few random tokens, ``Σ_e g_e f_e`` must equal
what the experts module returns and, with the shared views, what the block returns, to a tolerance of the block's
dtype. A block that fails (or cannot be called on its hidden states alone) raises :class:`BlockNotViewable`, which
:func:`~moe_lightning.adapters.find_moe_layers` reports and skips.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.adapters.base import MoEView, TokenFn
from moe_lightning.adapters.registry import BlockNotViewable
from moe_lightning.common import preserved_rng, restored_modes
from moe_lightning.geometry import JacobianOperator, swiglu_expert_jacobian, swiglu_jacobian_operator

__all__ = [
    "ADAPTER_NAME",
    "BlockNotViewable",
    "ExpertsInterfaceView",
    "SharedExpertView",
    "experts_child",
    "experts_interface_views",
    "is_experts_block",
    "is_experts_module",
]

ADAPTER_NAME = "hf-experts"
_CHECK_TOKENS = 8
# max |reconstruction - block output| / max |block output| allowed, by the block's dtype
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of the transformers experts interface: the flags
    ``use_experts_implementation`` sets, ``_apply_gate``, and 3-D ``down_proj`` and ``gate_up_proj``/``up_proj``."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")):
        return False
    if not callable(getattr(module, "_apply_gate", None)):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, Tensor) and isinstance(down, Tensor) and up.dim() == 3 and down.dim() == 3


def experts_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The ``(name, module)`` of ``block``'s experts-interface child, or None."""
    for name, child in block.named_children():
        if is_experts_module(child):
            return name, child
    return None


def is_experts_block(module: nn.Module) -> bool:
    """Whether ``module`` is an MoE block of the experts interface (it has an experts-interface child)."""
    return experts_child(module) is not None


class _ExpertsCalled(Exception):
    """Raised by the pre-hook on the experts module to stop a block's forward once its routing is known."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("experts called")
        self.args, self.kwargs = args, kwargs


def _routing_of(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts-interface call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(not isinstance(v, Tensor) for v in values):
        raise BlockNotViewable("its experts are not called as experts(hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


@contextmanager
def _router_outputs_unrecorded() -> Iterator[None]:
    """Keep transformers from recording the router outputs of the view's own calls: during a model forward that
    collects ``router_logits`` (for the aux loss), a recorded extra call would change the loss it trains on."""
    try:
        from transformers.utils import output_capturing

        collector = output_capturing._active_collector
    except (ImportError, AttributeError):
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


def _first_tensor(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else next(t for t in output if isinstance(t, Tensor))


def _is_default_gate(experts: nn.Module) -> bool:
    method = getattr(type(experts), "_apply_gate", None)
    return getattr(method, "__qualname__", "") == "_default_apply_gate" and "integrations.moe" in getattr(
        method, "__module__", ""
    )


def _is_silu(act: object) -> bool:
    """True for the activations ``transformers`` maps ``"silu"``/``"swish"`` to (``ACT2FN``)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def _takes_expert_ids(norm: object) -> bool:
    """Whether ``norm`` is a post-expert norm with a learned scale per expert: a module whose forward takes the
    expert ids besides the hidden states. An experts class that subclasses an interface class applies it after
    the interface's projections, in its own forward (Ergo's ``ErgoExperts``); the self-check confirms it."""
    if not isinstance(norm, nn.Module):
        return False
    try:
        parameters = inspect.signature(norm.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters) == 2


def _check_expert_index(name: str, e: int, num_experts: int) -> None:
    if not 0 <= e < num_experts:
        raise ValueError(f"{name}: expert index e={e} is out of range; allowed 0..{num_experts - 1}")


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """One expert's projection as the interface's kernels compute it: ``x @ W`` for a transposed layout
    (``W`` (in, out)), ``x @ Wᵀ`` otherwise (``W`` (out, in)), plus the bias."""
    weight = weight.to(x.dtype)
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias.to(x.dtype)


class _SwigluForms:
    """Closed forms of a view whose experts are plain SwiGLUs, from ``_swiglu_weights(e)``:
    ``(w_gate (D, H), w_up (D, H), w_down (H, D))`` in the right-multiplied layout of docs/geometry.md §1, or None."""

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        raise NotImplementedError

    def _closed_form(self, e: int, x_ND: Tensor, make):
        weights = self._swiglu_weights(e)
        if weights is None:
            return None
        return make(x_ND, *(w.to(x_ND.dtype) for w in weights))

    def expert_jacobian(self, e: int, x_ND: Tensor) -> Tensor | None:
        """Closed-form Jacobian of expert ``e`` at each token (N, D, D) for a plain SwiGLU; None otherwise, so that
        the probe uses ``torch.func``."""
        return self._closed_form(e, x_ND, swiglu_expert_jacobian)

    def expert_jacobian_operator(self, e: int, x_ND: Tensor) -> JacobianOperator | None:
        """Closed-form products ``J V`` / ``Jᵀ U`` of expert ``e`` for a plain SwiGLU; None otherwise."""
        return self._closed_form(e, x_ND, swiglu_jacobian_operator)


class ExpertsInterfaceView(_SwigluForms):
    """:class:`MoEView` of the routed experts of one experts-interface block (see the module docstring).

    Weights are read from the block at every call, so the view follows training. Build it with
    :func:`experts_interface_views`, which also runs the reconstruction self-check.

    Attributes:
        mode: ``"router"`` (gates from the block's router module) or ``"block"`` (from the block's own forward,
            intercepted at its experts call).
        output_scale: a constant the block multiplies its experts' output by (1.0 for most), measured by the
            self-check and folded into the gates.
        closed_form: whether the experts are plain SwiGLUs with closed-form Jacobians.
    """

    def __init__(self, name: str, block: nn.Module, experts_name: str) -> None:
        self.name, self.module = name, block
        self._experts_name = experts_name
        experts = self.experts
        up = experts.gate_up_proj if experts.has_gate else experts.up_proj
        self.num_experts = int(up.shape[0])
        self.mode = "block"
        self.output_scale = 1.0  # a constant the block multiplies its experts' output by, folded into the gates
        self._router: tuple[nn.Module, int, int] | None = None  # (router, index position, weights position)
        self.closed_form = bool(
            experts.has_gate
            and not experts.has_bias
            and not getattr(experts, "has_post_expert_norm", False)
            and not _takes_expert_ids(getattr(experts, "post_expert_norm", None))
            and _is_default_gate(experts)
            and _is_silu(getattr(experts, "act_fn", None))
        )

    @property
    def experts(self) -> nn.Module:
        return getattr(self.module, self._experts_name)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_experts={self.num_experts}, mode={self.mode!r}, "
            f"closed_form={self.closed_form}, output_scale={self.output_scale:g})"
        )

    # -- routing --------------------------------------------------------------------------------------------------

    def _block_routing(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the block's forward on ``x`` up to its experts call; return what it passes to the experts."""

        def stop(module, args, kwargs):
            raise _ExpertsCalled(args, kwargs)

        handle = self.experts.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.module.forward(x_ND.reshape(1, *x_ND.shape))
        except _ExpertsCalled as called:
            return _routing_of(called.args, called.kwargs)
        finally:
            handle.remove()
        raise BlockNotViewable("its forward returned without calling its experts module")

    def _scatter(self, index_NK: Tensor, weights_NK: Tensor, x_ND: Tensor) -> Tensor:
        index_NK = index_NK.reshape(x_ND.shape[0], -1).long()
        weights_NK = weights_NK.reshape(index_NK.shape)
        gates_NE = weights_NK.new_zeros(index_NK.shape[0], self.num_experts).scatter(-1, index_NK, weights_NK)
        return (gates_NE * self.output_scale if self.output_scale != 1.0 else gates_NE).to(x_ND.dtype)

    def gates(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (N, E): the block's own routing weights, 0 where a token is not routed (eval semantics)."""
        with restored_modes(self.module), _router_outputs_unrecorded():
            if self._router is not None:
                router, i_index, i_weights = self._router
                out = router.forward(x_ND)
                return self._scatter(out[i_index], out[i_weights], x_ND)
            _, index_NK, weights_NK = self._block_routing(x_ND)
            return self._scatter(index_NK, weights_NK, x_ND)

    def _find_router(self, x_ND: Tensor, index_NK: Tensor, weights_NK: Tensor) -> None:
        """Use a child whose forward on ``x`` returns exactly the block's ``(index, weights)`` as the router."""
        for _, child in self.module.named_children():
            if child is self.experts:
                continue
            try:
                with _router_outputs_unrecorded():
                    out = child.forward(x_ND)
            except Exception:  # noqa: BLE001 - a child that needs more than the tokens is not a router on its own
                continue
            if not isinstance(out, (tuple, list)):
                continue
            tensors = [(i, t) for i, t in enumerate(out) if isinstance(t, Tensor) and t.shape == index_NK.shape]
            i_index = next((i for i, t in tensors if not t.is_floating_point() and torch.equal(t, index_NK)), None)
            same_weights = [t.dtype == weights_NK.dtype and torch.equal(t, weights_NK) for _, t in tensors]
            i_weights = next((i for (i, _), same in zip(tensors, same_weights, strict=True) if same), None)
            if i_index is not None and i_weights is not None:
                self._router, self.mode = (child, i_index, i_weights), "router"
                return

    # -- experts --------------------------------------------------------------------------------------------------

    def _up(self, e: int, x_ND: Tensor) -> Tensor:
        experts = self.experts
        weight = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
        bias = None
        if experts.has_bias:
            bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[e]
        return _linear(x_ND, weight, bias, experts.is_transposed)

    def _hidden(self, e: int, x_ND: Tensor) -> Tensor:
        experts = self.experts
        projected = self._up(e, x_ND)
        return experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)

    def _down(self, e: int, h_NH: Tensor) -> Tensor:
        experts = self.experts
        bias = experts.down_proj_bias[e] if experts.has_bias else None
        out = _linear(h_NH, experts.down_proj[e], bias, experts.is_transposed)
        if getattr(experts, "has_post_expert_norm", False):
            out = experts.post_expert_norm(out)
        elif _takes_expert_ids(getattr(experts, "post_expert_norm", None)):
            out = experts.post_expert_norm(out, torch.full(out.shape[:1], e, dtype=torch.long, device=out.device))
        return out

    def expert(self, e: int) -> TokenFn:
        """Expert ``e`` as a function (N, D) -> (N, D), without its gate weight."""
        _check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._down(e, self._hidden(e, x_ND))

    def expert_hidden(self, e: int) -> TokenFn:
        """Expert ``e``'s activation after its gate/nonlinearity, the input of its down projection, (N, D) -> (N, H)."""
        _check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._hidden(e, x_ND)

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        _check_expert_index(self.name, e, self.num_experts)
        if not self.closed_form:
            return None
        experts = self.experts
        gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
        if not experts.is_transposed:  # stored (2H, D), (D, H): the nn.Linear layout
            gate_up, down = gate_up.T, down.T
        # the default _apply_gate splits the projection in halves: (gate, up) = chunk(2, dim=-1)
        w_gate_DH, w_up_DH = gate_up.chunk(2, dim=-1)
        return w_gate_DH, w_up_DH, down


class SharedExpertView(_SwigluForms):
    """:class:`MoEView` of one always-on shared expert of a block: one expert, gate ``sigmoid(gate(x))`` when the
    block has a one-output linear gate for it, else 1.

    ``module`` is the whole block, so hooks on it capture the input the shared and routed experts both read.
    """

    num_experts = 1

    def __init__(self, name: str, block: nn.Module, mlp_name: str, gate_name: str | None) -> None:
        self.name, self.module = name, block
        self._mlp_name, self._gate_name = mlp_name, gate_name
        mlp = self.mlp
        self.closed_form = (
            all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            and all(getattr(mlp, p).bias is None for p in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(mlp, "act_fn", None))
        )

    @property
    def mlp(self) -> nn.Module:
        return getattr(self.module, self._mlp_name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_experts=1, gated={self._gate_name is not None})"

    def gates(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (N, 1): ``sigmoid(gate(x))``, or ones for an ungated shared expert."""
        if self._gate_name is None:
            return x_ND.new_ones(x_ND.shape[0], 1)
        return torch.sigmoid(getattr(self.module, self._gate_name).forward(x_ND)).to(x_ND.dtype)

    def expert(self, e: int) -> TokenFn:
        """The shared MLP, (N, D) -> (N, D); ``e`` must be 0."""
        _check_expert_index(self.name, e, 1)
        return lambda x_ND: self.mlp.forward(x_ND)

    def expert_hidden(self, e: int) -> TokenFn | None:
        """The shared SwiGLU's ``act(x W_gate) * (x W_up)`` (N, H), or None for another MLP; ``e`` must be 0."""
        _check_expert_index(self.name, e, 1)
        if not self.closed_form:
            return None
        mlp = self.mlp
        return lambda x_ND: mlp.act_fn(F.linear(x_ND, mlp.gate_proj.weight)) * F.linear(x_ND, mlp.up_proj.weight)

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        _check_expert_index(self.name, e, 1)
        if not self.closed_form:
            return None
        mlp = self.mlp
        return mlp.gate_proj.weight.T, mlp.up_proj.weight.T, mlp.down_proj.weight.T


def _relative_error(got: Tensor, want: Tensor) -> float:
    """``max |got - want| / max |want|``: relative to the output's own size, so that a block with small outputs (a
    freshly initialised model) is checked as strictly as any other."""
    scale = max(float(want.abs().max()), torch.finfo(torch.float64).tiny)
    return float((got.double() - want.double()).abs().max()) / scale


def _check_sample(block: nn.Module) -> Tensor:
    """A few random tokens in the dtype and on the device of the block's experts (a router kept in float32 does not
    decide it), from a generator of their own (the global RNG stays)."""
    experts = next(c for c in block.children() if is_experts_module(c))
    down = experts.down_proj
    if down.is_meta:
        raise BlockNotViewable("its weights are not materialised (meta device), so its views cannot be checked")
    width = int(down.shape[-1 if experts.is_transposed else -2])
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(_CHECK_TOKENS, width, generator=generator, dtype=torch.float32)
    return x.to(device=down.device, dtype=down.dtype if down.is_floating_point() else torch.float32)


def _routed_sum(view: ExpertsInterfaceView, gates_NE: Tensor, x_ND: Tensor) -> Tensor:
    """``Σ_e g_e f_e(x)``, each expert run on the tokens routed to it only (a large model has hundreds of experts)."""
    out = torch.zeros_like(x_ND)
    for e in torch.nonzero(gates_NE.abs().sum(0)).flatten().tolist():
        rows = gates_NE[:, e] != 0
        out[rows] += gates_NE[rows, e : e + 1] * view.expert(e)(x_ND[rows])
    return out


def _shared_candidates(block: nn.Module, skip: set[int], x_ND: Tensor) -> tuple[list[str], list[str]]:
    """Children (besides experts and router) with weights that map (N, D) -> (N, D), and one-output gates."""
    mlps, gates = [], []
    for name, child in block.named_children():
        if id(child) in skip or next(child.parameters(), None) is None:
            continue
        try:
            with _router_outputs_unrecorded():
                out = child.forward(x_ND)
        except Exception:  # noqa: BLE001 - not a function of the tokens alone
            continue
        if isinstance(out, Tensor) and out.shape == x_ND.shape:
            mlps.append(name)
        elif isinstance(out, Tensor) and out.shape == (*x_ND.shape[:-1], 1) and isinstance(child, nn.Linear):
            gates.append(name)
    return mlps, gates


def _shared_views(path: str, block: nn.Module, routed: ExpertsInterfaceView, x_ND: Tensor, residual: Tensor):
    """The shared-expert views that explain ``residual`` (block output minus the routed part), tried smallest first;
    None if no combination of the block's token-to-token children does."""
    skip = {id(routed.experts)} | ({id(routed._router[0])} if routed._router is not None else set())
    mlps, gates = _shared_candidates(block, skip, x_ND)
    tol = _TOLERANCE.get(x_ND.dtype, 1e-4)
    if _relative_error(torch.zeros_like(residual), residual) <= tol:
        return []
    for size in range(1, len(mlps) + 1):
        for subset in itertools.combinations(mlps, size):
            gate_choices = [gates[0], None] if size == 1 and len(gates) == 1 else [None]
            for gate in gate_choices:
                views = [SharedExpertView(f"{path}.{m}" if path else m, block, m, gate) for m in subset]
                total = sum(v.gates(x_ND) * v.expert(0)(x_ND) for v in views)
                if _relative_error(total, residual) <= tol:
                    return views
    return None


def _extra_inputs(block: nn.Module) -> list[str]:
    """Named inputs of the block's forward besides the hidden states: the model may route with them (token ids,
    a previous layer's router state), so routing from the hidden states alone would not be the model's."""
    try:
        parameters = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[1:]]


def experts_interface_views(path: str, block: nn.Module) -> list[MoEView]:
    """The views of one experts-interface block: its routed experts, then one view per shared expert; the block's
    reconstruction self-check runs first.

    Raises:
        BlockNotViewable: the block cannot be called on its hidden states alone, transforms them before its
            experts, or its views do not sum to its output on random tokens (the message says which and by how much).
    """
    found = experts_child(block)
    if found is None:
        raise BlockNotViewable("it has no experts-interface child")
    extra = _extra_inputs(block)
    if extra:
        raise BlockNotViewable(
            f"its forward takes inputs besides the hidden states ({', '.join(extra)}), which its views cannot see"
        )
    routed = ExpertsInterfaceView(path, block, found[0])
    x_ND = _check_sample(block)
    tol = _TOLERANCE.get(x_ND.dtype, 1e-4)
    captured: dict[str, Any] = {}

    def record(module, args, kwargs, output):
        captured["routing"], captured["output"] = _routing_of(args, kwargs), output

    handle = routed.experts.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), preserved_rng(), restored_modes(block), _router_outputs_unrecorded():
            try:
                block_out = _first_tensor(block.forward(x_ND.reshape(1, *x_ND.shape))).reshape(x_ND.shape)
            except Exception as error:  # noqa: BLE001 - reported: the block needs more than its hidden states
                raise BlockNotViewable(
                    f"calling it on its hidden states alone fails ({type(error).__name__}: {error})"
                ) from error
            if "routing" not in captured:
                raise BlockNotViewable("its forward does not call its experts module")
            hidden, index_NK, weights_NK = captured["routing"]
            if hidden.shape != x_ND.shape or not torch.equal(hidden, x_ND):
                raise BlockNotViewable("it transforms its input before its experts (the experts see other tokens)")
            if index_NK.shape[0] != x_ND.shape[0] or int(index_NK.max()) >= routed.num_experts:
                raise BlockNotViewable(f"its routing indices do not address its {routed.num_experts} experts")
            routed._find_router(x_ND, index_NK, weights_NK)
            gates_NE = routed.gates(x_ND)
            if not torch.equal(gates_NE, routed._scatter(index_NK, weights_NK, x_ND)):
                raise BlockNotViewable("its gates differ from the routing it passes to its experts")
            routed_out = _routed_sum(routed, gates_NE, x_ND)
            error = _relative_error(routed_out, _first_tensor(captured["output"]).reshape(x_ND.shape))
            if error > tol:
                raise BlockNotViewable(
                    f"Σ gates·experts differs from its experts module's output by {error:.2e} (tolerance {tol:.0e})"
                )
            shared = _shared_views(path, block, routed, x_ND, block_out - routed_out)
            if shared is None:
                # a block that scales its experts' output by a constant (a routed scaling factor applied after the
                # experts): the constant is measured here and must explain the output exactly
                scale = float((block_out.double() * routed_out.double()).sum() / routed_out.double().square().sum())
                if math.isfinite(scale) and _relative_error(scale * routed_out, block_out) <= tol:
                    routed.output_scale, shared = scale, []
            if shared is None:
                error = _relative_error(routed_out, block_out)
                raise BlockNotViewable(
                    "its output is not Σ gates·experts plus shared experts of its children (routed part off by "
                    f"{error:.2e}, tolerance {tol:.0e})"
                )
            for view in [routed, *shared]:
                if view.closed_form:  # the closed forms must describe the same function as the expert
                    w_gate, w_up, w_down = view._swiglu_weights(0)
                    x = x_ND.to(w_gate.dtype)
                    swiglu = (F.silu(x @ w_gate) * (x @ w_up)) @ w_down
                    if _relative_error(swiglu, view.expert(0)(x)) > tol:
                        view.closed_form = False
    finally:
        handle.remove()
    return [routed, *shared]
