"""Edge-of-stability thresholds of the optimiser, beside the loss curvature (docs/geometry.md §7).

Shape legend: ``P`` number of parameter entries.

- SGD (Cohen et al., 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", §2 and
  appendix on momentum): on a quadratic of curvature ``λ`` heavy-ball momentum ``μ`` with learning rate ``η``
  diverges once ``λ > (2 + 2μ)/η`` (plain SGD: ``2/η``), Nesterov once ``λ > (2 + 2μ)/((1 + 2μ)η)``. Torch's
  ``dampening`` ``d`` scales the gradient into the buffer by ``1 − d``; coupled ``weight_decay`` adds ``wd`` to
  every eigenvalue, so the threshold on the Hessian of the loss is lower by ``wd``.
- Adam/AdamW (Cohen et al., 2022, "Adaptive Gradient Methods at the Edge of Stability", §2): Adam is preconditioned
  EMA momentum ``w ← w − η P⁻¹ m`` with ``P = (1 − β₁ᵗ) diag(sqrt(v̂) + ε)`` and ``v̂ = v/(1 − β₂ᵗ)``; it is stable
  while the preconditioned sharpness ``λ₁(P⁻¹H)`` stays below ``(2 + 2β₁)/((1 − β₁)η)`` (``38/η`` for
  ``β₁ = 0.9``). ``η`` sits in the threshold, not in ``P``. ``P⁻¹H`` has the eigenvalues of the symmetric
  ``P^{-1/2} H P^{-1/2}``, which Lanczos runs on. Adam's coupled ``weight_decay`` and AdamW's decoupled decay are
  left out, as in the paper's threshold.

Each reads the optimiser's own ``param_groups`` and state at the time of the call; an optimiser of another kind,
parameters it does not hold, groups with different hyperparameters, or Adam without state (before its first step)
give no value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moe_lightning.geometry.curvature import hessian_eigenvalues

__all__ = ["adam_preconditioner", "adam_stability_threshold", "edge_of_stability", "sgd_stability_threshold"]

_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
_ADAM_KEYS = ("lr", "betas", "eps", "amsgrad")


def sgd_stability_threshold(group: dict) -> float:
    """The largest stable Hessian eigenvalue of ``torch.optim.SGD`` with ``group``'s hyperparameters."""
    lr, mu = float(group["lr"]), float(group.get("momentum", 0.0))
    kept = 1.0 - float(group.get("dampening", 0.0))  # the share of each gradient that enters the buffer
    if mu == 0.0:
        limit = 2.0 / lr
    elif group.get("nesterov", False):
        # z = −1 root of the heavy-ball-plus-look-ahead recurrence on a quadratic
        limit = (2.0 + 2.0 * mu) / (lr * (1.0 + mu + mu * kept))
    else:
        limit = (2.0 + 2.0 * mu) / (lr * kept)
    return limit - float(group.get("weight_decay", 0.0))


def adam_stability_threshold(group: dict) -> float:
    """``(2 + 2β₁)/((1 − β₁)η)``, the preconditioned-sharpness threshold of Adam (Cohen et al., 2022)."""
    beta1 = float(group["betas"][0])
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * float(group["lr"]))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """``(P,)`` diagonal of Adam's ``P = (1 − β₁ᵗ)(sqrt(v̂) + ε)`` for ``params`` (flattened in order), from the
    optimiser's state; None when a parameter has no state yet."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        group = group_of[id(p)]
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v_hat = v.detach().to(torch.float64) / (1.0 - beta2**t)
        parts.append(((1.0 - beta1**t) * (v_hat.sqrt() + float(group["eps"]))).reshape(-1))
    return torch.cat(parts)


def _common_group(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], keys: tuple[str, ...]) -> dict | None:
    """The hyperparameters ``keys`` of the groups holding ``params``, if every parameter is held and they agree."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) not in group_of for p in params):
        return None
    values = {tuple(str(group_of[id(p)].get(k)) for k in keys) for p in params}
    return {k: group_of[id(params[0])].get(k) for k in keys} if len(values) == 1 else None


def edge_of_stability(
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    **lanczos_options,
) -> dict[str, float]:
    """The optimiser's stability threshold, and for Adam/AdamW the preconditioned sharpness ``λ₁(P⁻¹H)``.

    Args:
        optimizer: the optimiser that trains ``params``.
        loss_fn: the loss whose Hessian is taken.
        params: the parameters (all held by ``optimizer``).
        lanczos_options: passed to :func:`~moe_lightning.geometry.curvature.hessian_eigenvalues` (``max_iter``,
            ``tol``, ``seed``, ``all_reduce``, ``world_size``).

    Returns:
        ``{"sgd_stability_threshold"}`` for SGD; ``{"preconditioned_top_eigenvalue",
        "preconditioned_top_converged", "adam_stability_threshold"}`` for Adam/AdamW with state; else ``{}``.
    """
    params = list(params)
    if isinstance(optimizer, torch.optim.SGD):
        group = _common_group(optimizer, params, _SGD_KEYS)
        return {} if group is None else {"sgd_stability_threshold": sgd_stability_threshold(group)}
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return {}
    group = _common_group(optimizer, params, _ADAM_KEYS)
    diag_P = None if group is None else adam_preconditioner(optimizer, params)
    if diag_P is None:
        return {}
    res = hessian_eigenvalues(loss_fn, params, k=1, which="largest", preconditioner=diag_P, **lanczos_options)
    return {
        "preconditioned_top_eigenvalue": float(res.eigenvalues[0]),
        "preconditioned_top_converged": float(res.all_converged),
        "adam_stability_threshold": adam_stability_threshold(group),
    }
