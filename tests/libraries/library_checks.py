"""What every library test checks of a built-in adapter, against the library's own code: the view check passes, the
probe's per-token expert and layer Jacobian σ_max equal autograd's on the library's own expert modules and layer
forward, and a short training with the three monitors logs the layer's keys, the router loads the library's own
routing gives, and ends in the weights training without them ends in.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from helpers import fit_logged
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.geometry import MoEView, probe, verify_view
from moe_lightning.geometry.verify import layer_output

TokenFn = Callable[[Tensor], Tensor]

# 16 float32 units (2**-24 each): how far a layer that rounds part of its forward to float32 whatever its dtype may
# miss a float64 reference; a wrong view misses by the size of a gate or an expert output, 1e-2 and more.
FLOAT32_ROUNDING = 2.0**-20


def sigma_max(fn: TokenFn, x_D: Tensor) -> float:
    """σ_max of autograd's Jacobian of ``fn`` at one token (``fn`` maps ``(1, D)`` to ``(1, D)``)."""
    jacobian = torch.autograd.functional.jacobian(lambda t: fn(t[None])[0], x_D)
    return float(torch.linalg.svdvals(jacobian)[0])


def assert_matches_autograd(
    layer: nn.Module,
    views: list[MoEView],
    x_ND: Tensor,
    own_expert: Callable[[int], TokenFn],
    own_routed_output: TokenFn | None = None,
    float32_inside: bool = False,
    rtol: float = 1e-9,
) -> None:
    """The views pass their check with a float64 miss under 1e-12; the probe's gate-weighted per-expert σ_max and its
    layer σ_max (docs/geometry.md §2) equal autograd's.

    Args:
        layer: the library's MoE layer, in float64.
        views: every view of it (the routed one first).
        x_ND: float64 tokens.
        own_expert: ``own_expert(e)`` runs the library's own expert ``e`` on ``(n, D)`` tokens.
        own_routed_output: the layer's routed experts' output (the layer's forward less its shared experts, where it
            has them), ``(n, D) -> (n, D)``; None, the layer's own output.
        float32_inside: the layer computes part of its forward in float32 whatever its dtype (torchtitan's router
            scores and its weighted sum of the experts), so its float64 output and Jacobian carry float32 rounding:
            the view's reconstruction and the layer σ_max are then held to :data:`FLOAT32_ROUNDING`, and the view
            check's float64 tolerance (1e-9) is not asked of it; the per-expert σ_max stays held to 1e-9.
        rtol: relative tolerance of the σ_max comparisons; float32's for a router that computes in float32 whatever
            the layer's dtype, whose gate derivatives then agree between two of its code paths only to float32.
    """
    layer.eval()
    check = verify_view(views, x_ND)
    if float32_inside:
        # determinism and per-token run before reconstruction, so a check that failed there passed both
        assert check.failed in (None, "reconstruction") and check.miss < FLOAT32_ROUNDING, check.message()
    else:
        assert check.passed and check.miss < 1e-12, check.message()
    routed = views[0]
    scalars = probe(routed, x_ND).scalars("g")
    with torch.no_grad():
        gates_NE = routed.gates(x_ND)
    for e in range(routed.num_experts):
        weights = gates_NE[:, e]
        tokens = weights.nonzero().flatten().tolist()
        if not tokens:
            continue
        sigmas = torch.tensor([sigma_max(own_expert(e), x_ND[i]) for i in tokens], dtype=torch.float64)
        expected = float((weights[tokens] * sigmas).sum() / weights[tokens].sum())
        assert abs(scalars[f"g/jac_sigma_max/e{e}"] - expected) < rtol * max(1.0, expected), e
    output = own_routed_output or (lambda x: layer_output(layer, x))
    expected = sum(sigma_max(output, x_D) for x_D in x_ND) / x_ND.shape[0]
    tolerance = max(rtol, FLOAT32_ROUNDING) if float32_inside else rtol
    assert abs(scalars["g/layer_jac_sigma_max"] - expected) < tolerance * max(1.0, expected)


class Wrapped(L.LightningModule):
    """A regression model around a library's MoE layer: ``in -> layer -> out``, the layer's first output taken."""

    def __init__(self, layer: nn.Module, dim: int) -> None:
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(dim, dim), layer, nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(self.inp(x))
        return self.out(y[0] if isinstance(y, (tuple, list)) else y)

    def loss(self, batch) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def train_with_monitors(
    make_layer: Callable[[], nn.Module], dim: int, tmp_path, steps: int = 2, seq: int = 6
) -> tuple[list[dict[str, str]], list[Tensor], dict[str, Tensor]]:
    """Train ``Wrapped(make_layer())`` for ``steps`` steps with the three monitors probing every step, and again
    without them (same seed, same data).

    Returns:
        The logged rows, the layer's input at each training step (recorded by a hook of the test), and the final
        weights and buffers (non-persistent ones too, such as torchtitan's token counter); they are checked equal to
        those of the run without monitors.
    """
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4 * steps, seq, dim), torch.randn(4 * steps, seq, dim)), batch_size=4)

    def run(callbacks: list, log_dir) -> tuple[list[dict[str, str]], list[Tensor], dict[str, Tensor]]:
        module = Wrapped(initial_layer(make_layer), dim)
        inputs: list[Tensor] = []
        module.layer.register_forward_hook(
            lambda m, args, out: inputs.append(args[0].detach().clone()) if m.training else None
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|log_every_n_steps).*")
            rows = fit_logged(module, data, log_dir, callbacks, max_steps=steps)
        state = {**dict(module.named_buffers()), **module.state_dict()}
        return rows, inputs, {k: v.detach().clone() for k, v in state.items()}

    monitors = [
        GeometryMonitor(every_n_steps=1, max_tokens=16),
        RouterMonitor(log_every_n_steps=1),
        CurvatureMonitor(every_n_steps=1, at_fit_start=True),
    ]
    rows, inputs, weights = run(monitors, tmp_path / "with")
    _, _, plain = run([], tmp_path / "without")
    assert weights.keys() == plain.keys()
    for key, value in weights.items():
        assert torch.equal(value, plain[key]), f"{key} differs after training with the monitors"
    return rows, inputs, weights


def initial_layer(make_layer: Callable[[], nn.Module]) -> nn.Module:
    """The layer :func:`train_with_monitors` starts from: ``make_layer()`` right after ``torch.manual_seed(1)``."""
    torch.manual_seed(1)
    return make_layer()


def logged_loads(rows: list[dict[str, str]], layer: str, step: int, num_experts: int) -> Tensor:
    """RouterMonitor's ``router/<layer>/load/e<i>`` at ``step``."""
    (row,) = [r for r in rows if int(r["step"]) == step and r.get(f"router/{layer}/load/e0") not in (None, "")]
    return torch.tensor([float(row[f"router/{layer}/load/e{i}"]) for i in range(num_experts)], dtype=torch.float64)
