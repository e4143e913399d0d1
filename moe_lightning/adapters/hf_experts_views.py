"""The views of an experts-interface block: :class:`ExpertsInterfaceView` for its routed experts and
:class:`SharedExpertView` for each shared expert. :func:`~moe_lightning.adapters.hf_experts.experts_interface_views`
builds them and runs the reconstruction self-check; its module describes what they are made of.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``H`` expert hidden.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.adapters.registry import BlockNotViewable
from moe_lightning.adapters.swiglu import SwigluClosedForms, check_expert_index, is_silu, swiglu_hidden
from moe_lightning.common import restored_modes
from moe_lightning.geometry.lending import with_cast_copies
from moe_lightning.geometry.view import TokenFn

__all__ = ["ExpertsInterfaceView", "SharedExpertView", "routing_of", "router_outputs_unrecorded"]


class _ExpertsCalled(Exception):
    """Raised by the pre-hook on the experts module to stop a block's forward once its routing is known."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("experts called")
        self.args, self.kwargs = args, kwargs


def routing_of(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts-interface call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(not isinstance(v, Tensor) for v in values):
        raise BlockNotViewable("its experts are not called as experts(hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


@contextmanager
def router_outputs_unrecorded() -> Iterator[None]:
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


def _is_default_gate(experts: nn.Module) -> bool:
    method = getattr(type(experts), "_apply_gate", None)
    return getattr(method, "__qualname__", "") == "_default_apply_gate" and "integrations.moe" in getattr(
        method, "__module__", ""
    )


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


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _projections(experts: nn.Module) -> list[Tensor]:
    """The stacked expert weights and biases of an experts module, which :func:`_linear` reads one expert's slice
    of, cast, at a time."""
    names = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
    return [t for t in (getattr(experts, n, None) for n in names) if isinstance(t, Tensor)]


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """One expert's projection as the interface's kernels compute it: ``x @ W`` for a transposed layout
    (``W`` (in, out)), ``x @ Wᵀ`` otherwise (``W`` (out, in)), plus the bias."""
    weight = weight.to(x.dtype)
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias.to(x.dtype)


class ExpertsInterfaceView(SwigluClosedForms):
    """:class:`MoEView` of the routed experts of one experts-interface block (see the module docstring).

    Weights are read from the block at every call, so the view follows training. Build it with
    :func:`experts_interface_views`, which also runs the reconstruction self-check.

    The functions cast what they read to their input's dtype (:class:`~moe_lightning.geometry.view.CastsOnRead`):
    an expert's projections one expert's slice per call, and the block's other tensors (the router, a tensor the
    block holds itself, a post-expert norm: small) through cast copies lent for the call, so that a probe in float64
    needs no float64 copy of the stacked expert weights.

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
        self._router_in_float32 = False  # whether the router casts its input to float32 (found with the router)
        self.closed_form = bool(
            experts.has_gate
            and not experts.has_bias
            and not getattr(experts, "has_post_expert_norm", False)
            and not _takes_expert_ids(getattr(experts, "post_expert_norm", None))
            and _is_default_gate(experts)
            and is_silu(getattr(experts, "act_fn", None))
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
            return routing_of(called.args, called.kwargs)
        finally:
            handle.remove()
        raise BlockNotViewable("its forward returned without calling its experts module")

    def _scatter(self, index_NK: Tensor, weights_NK: Tensor, x_ND: Tensor) -> Tensor:
        index_NK = index_NK.reshape(x_ND.shape[0], -1).long()
        weights_NK = weights_NK.reshape(index_NK.shape)
        gates_NE = weights_NK.new_zeros(index_NK.shape[0], self.num_experts).scatter(-1, index_NK, weights_NK)
        return (gates_NE * self.output_scale if self.output_scale != 1.0 else gates_NE).to(x_ND.dtype)

    def gates(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (N, E): the block's own routing weights, 0 where a token is not routed (eval semantics).

        The router (or, in block mode, every tensor of the block but its experts module's, which the forward stops
        before) reads copies cast to the dtype of ``x`` lent for the call: the values a copy of the whole block
        gives, without copying the experts."""
        with restored_modes(self.module), router_outputs_unrecorded():
            if self._router is not None:
                router, i_index, i_weights = self._router
                in_float32 = self._router_in_float32
                out = with_cast_copies(router, x_ND.dtype, lambda: _router_forward(router, x_ND, in_float32))
                return self._scatter(out[i_index], out[i_weights], x_ND)
            skip = _tensors(self.experts)
            routing = with_cast_copies(self.module, x_ND.dtype, lambda: self._block_routing(x_ND), skip=skip)
            _, index_NK, weights_NK = routing
            return self._scatter(index_NK, weights_NK, x_ND)

    def _find_router(self, x_ND: Tensor, index_NK: Tensor, weights_NK: Tensor) -> None:
        """Use a child whose forward on ``x`` returns exactly the block's ``(index, weights)`` as the router."""
        for _, child in self.module.named_children():
            if child is self.experts:
                continue
            try:
                with router_outputs_unrecorded():
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
                with router_outputs_unrecorded():
                    self._router_in_float32 = _routes_in_float32(child, x_ND)
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

    def _cast_call(self, x_ND: Tensor, fn: Callable[[], Tensor]) -> Tensor:
        """``fn()`` with the experts module's tensors other than its projections (a post-expert norm's scales, an
        activation's parameters; most experts have none) lent cast to the dtype of ``x`` for the call, as a copy of
        the whole block would give them; the projections are cast one expert's slice at a time."""
        experts = self.experts
        return with_cast_copies(experts, x_ND.dtype, fn, skip=_projections(experts))

    def expert(self, e: int) -> TokenFn:
        """Expert ``e`` as a function (N, D) -> (N, D), without its gate weight."""
        check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._cast_call(x_ND, lambda: self._down(e, self._hidden(e, x_ND)))

    def expert_hidden(self, e: int) -> TokenFn:
        """Expert ``e``'s activation after its gate/nonlinearity, the input of its down projection, (N, D) -> (N, H)."""
        check_expert_index(self.name, e, self.num_experts)
        return lambda x_ND: self._cast_call(x_ND, lambda: self._hidden(e, x_ND))

    def casts_weights_on_read(self) -> bool:
        """True: every function casts what it reads to its input's dtype (the class docstring says how), so a probe
        lends the block no cast copy."""
        return True

    def expert_weights(self, e: int) -> dict[str, Tensor]:
        """Expert ``e``'s matrices as the experts module holds them (views, any layout): ``w_gate`` and ``w_up``
        (the halves of ``gate_up_proj`` that the default ``_apply_gate`` splits) and ``w_out`` (``down_proj``);
        ``w_gate_up`` whole where the module gates another way (interleaved, clamped), ``w_in`` (``up_proj``)
        without a gate."""
        check_expert_index(self.name, e, self.num_experts)
        experts = self.experts
        down = experts.down_proj[e]
        if not experts.has_gate:
            return {"w_in": experts.up_proj[e], "w_out": down}
        gate_up = experts.gate_up_proj[e]
        if not _is_default_gate(experts):
            return {"w_gate_up": gate_up, "w_out": down}
        # the default _apply_gate splits the projection's output in halves, (gate, up) = chunk(2, dim=-1)
        w_gate, w_up = gate_up.chunk(2, dim=-1 if experts.is_transposed else 0)
        return {"w_gate": w_gate, "w_up": w_up, "w_out": down}

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        check_expert_index(self.name, e, self.num_experts)
        if not self.closed_form:
            return None
        experts = self.experts
        gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
        if not experts.is_transposed:  # stored (2H, D), (D, H): the nn.Linear layout
            gate_up, down = gate_up.T, down.T
        # the default _apply_gate splits the projection in halves: (gate, up) = chunk(2, dim=-1)
        w_gate_DH, w_up_DH = gate_up.chunk(2, dim=-1)
        return w_gate_DH, w_up_DH, down


class SharedExpertView(SwigluClosedForms):
    """:class:`MoEView` of one always-on shared expert of a block: one expert, gate ``sigmoid(gate(x))`` when the
    block has a one-output linear gate for it, else 1.

    ``module`` is the whole block, so hooks on it capture the input the shared and routed experts both read. The
    shared MLP and its gate (small modules) read copies of their tensors cast to the input's dtype, lent for each
    call (:class:`~moe_lightning.geometry.view.CastsOnRead`).
    """

    num_experts = 1

    def __init__(self, name: str, block: nn.Module, mlp_name: str, gate_name: str | None) -> None:
        self.name, self.module = name, block
        self._mlp_name, self._gate_name = mlp_name, gate_name
        mlp = self.mlp
        self.closed_form = (
            all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
            and all(getattr(mlp, p).bias is None for p in ("gate_proj", "up_proj", "down_proj"))
            and is_silu(getattr(mlp, "act_fn", None))
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
        gate = getattr(self.module, self._gate_name)
        return with_cast_copies(gate, x_ND.dtype, lambda: torch.sigmoid(gate.forward(x_ND))).to(x_ND.dtype)

    def expert(self, e: int) -> TokenFn:
        """The shared MLP, (N, D) -> (N, D); ``e`` must be 0."""
        check_expert_index(self.name, e, 1)

        def shared(x_ND: Tensor) -> Tensor:
            mlp = self.mlp
            return with_cast_copies(mlp, x_ND.dtype, lambda: mlp.forward(x_ND))

        return shared

    def expert_hidden(self, e: int) -> TokenFn | None:
        """The shared SwiGLU's ``act(x W_gate) * (x W_up)`` (N, H), or None for another MLP; ``e`` must be 0."""
        check_expert_index(self.name, e, 1)
        if not self.closed_form:
            return None
        mlp = self.mlp
        return lambda x_ND: swiglu_hidden(x_ND, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.act_fn)

    def expert_weights(self, e: int) -> dict[str, Tensor] | None:
        """The shared MLP's ``gate_proj``, ``up_proj`` and ``down_proj`` weights as ``w_gate``, ``w_up`` and
        ``w_out`` (views of the parameters), or None for an MLP of another shape; ``e`` must be 0."""
        check_expert_index(self.name, e, 1)
        projections = [getattr(self.mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projections):
            return None
        return dict(zip(("w_gate", "w_up", "w_out"), (p.weight for p in projections), strict=True))

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        check_expert_index(self.name, e, 1)
        if not self.closed_form:
            return None
        mlp = self.mlp
        return mlp.gate_proj.weight.T, mlp.up_proj.weight.T, mlp.down_proj.weight.T

    def casts_weights_on_read(self) -> bool:
        """True: the gate and the shared MLP read cast copies lent for the call, and the closed forms and
        ``expert_hidden`` cast the projections they read."""
        return True


def _routes_in_float32(router: nn.Module, x_ND: Tensor) -> bool:
    """Whether ``router`` casts its input to float32 (routes in float32, as Inkling2's does): lent float64 weights,
    its forward on float64 tokens then mixes dtypes."""
    try:
        with_cast_copies(router, torch.float64, lambda: router.forward(x_ND.double()))
    except RuntimeError as error:
        return "same dtype" in str(error)
    return False


def _router_forward(router: nn.Module, x_ND: Tensor, in_float32: bool = False) -> Any:
    """``router.forward(x_ND)``; a router that casts its input to float32 (``in_float32``, or found by its forward
    failing) while it is lent float64 weights runs on float32 copies of its weights instead, as the model runs it.
    Known in advance, the forward is not tried: inside ``torch.func.linearize`` a failed op stays in the traced
    graph, whose constant folding runs it again and fails."""
    if not in_float32:
        try:
            return router.forward(x_ND)
        except RuntimeError as error:
            if "same dtype" not in str(error):
                raise
    state = {**dict(router.named_parameters()), **dict(router.named_buffers())}
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    return torch.func.functional_call(router, state, (x_ND.float(),))
