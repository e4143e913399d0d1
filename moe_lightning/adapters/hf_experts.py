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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.adapters.hf_experts_views import (
    ExpertsInterfaceView,
    SharedExpertView,
    router_outputs_unrecorded,
    routing_of,
)
from moe_lightning.adapters.registry import BlockNotViewable
from moe_lightning.common import preserved_rng, restored_modes
from moe_lightning.geometry import MoEView

__all__ = ["ADAPTER_NAME", "experts_child", "experts_interface_views", "is_experts_block", "is_experts_module"]

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


def _first_tensor(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else next(t for t in output if isinstance(t, Tensor))


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
            with router_outputs_unrecorded():
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


def _routed_gates(routed: ExpertsInterfaceView, x_ND: Tensor, routing: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The routed view's gates on the sample ``x_ND``, checked against the ``routing`` the block passed its experts
    (its router found on the way, where a child gives that routing on its own)."""
    hidden, index_NK, weights_NK = routing
    if hidden.shape != x_ND.shape or not torch.equal(hidden, x_ND):
        raise BlockNotViewable("it transforms its input before its experts (the experts see other tokens)")
    if index_NK.shape[0] != x_ND.shape[0] or int(index_NK.max()) >= routed.num_experts:
        raise BlockNotViewable(f"its routing indices do not address its {routed.num_experts} experts")
    routed._find_router(x_ND, index_NK, weights_NK)
    gates_NE = routed.gates(x_ND)
    if not torch.equal(gates_NE, routed._scatter(index_NK, weights_NK, x_ND)):
        raise BlockNotViewable("its gates differ from the routing it passes to its experts")
    return gates_NE


def _confirm_closed_forms(views: list[ExpertsInterfaceView | SharedExpertView], x_ND: Tensor, tol: float) -> None:
    """Keep a view's closed forms only where they describe the same function as its expert on ``x_ND``."""
    for view in views:
        if view.closed_form:
            w_gate, w_up, w_down = view._swiglu_weights(0)
            x = x_ND.to(w_gate.dtype)
            swiglu = (F.silu(x @ w_gate) * (x @ w_up)) @ w_down
            if _relative_error(swiglu, view.expert(0)(x)) > tol:
                view.closed_form = False


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
        captured["routing"], captured["output"] = routing_of(args, kwargs), output

    handle = routed.experts.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), preserved_rng(), restored_modes(block), router_outputs_unrecorded():
            try:
                block_out = _first_tensor(block.forward(x_ND.reshape(1, *x_ND.shape))).reshape(x_ND.shape)
            except Exception as error:  # noqa: BLE001 - reported: the block needs more than its hidden states
                raise BlockNotViewable(
                    f"calling it on its hidden states alone fails ({type(error).__name__}: {error})"
                ) from error
            if "routing" not in captured:
                raise BlockNotViewable("its forward does not call its experts module")
            gates_NE = _routed_gates(routed, x_ND, captured["routing"])
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
            _confirm_closed_forms([routed, *shared], x_ND, tol)
    finally:
        handle.remove()
    return [routed, *shared]
