"""WeightSpectraMonitor and its core: the keys a tiny fit logs are the weight spectra of the weights at each logged
step (against the pure functions on the parameters themselves), training ends in the weights of a fit without it,
the experts split over ranks sum to one process's values, and a value that cannot be trusted has no key.

Shape legend: ``E`` experts, ``D`` model dim, ``H`` expert hidden width.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import logged, quiet_fit, read_metrics
from torch import nn

from moe_lightning.adapters import find_moe_layers
from moe_lightning.callbacks import WeightSpectraMonitor
from moe_lightning.geometry.weight_spectra import fit_power_law, matrix_eigenvalues
from moe_lightning.monitors import Ranks, WeightSpectraProbe
from moe_lightning.monitors.weight_spectra import measured_experts
from moe_lightning.nn.layer import MoEConfig, MoELayer

D, H, E = 24, 32, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.ffn = MoELayer(MoEConfig(dim=D, expert_hidden=H, num_experts=E, top_k=2, activation="swiglu"))
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.ffn(h)[0])


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def alpha_of(weight: torch.Tensor) -> float:
    fit = fit_power_law(matrix_eigenvalues(weight))
    return math.nan if fit is None else fit.alpha


@pytest.mark.integration  # trains twice
def test_logged_keys_are_the_spectra_of_the_weights_and_training_is_unchanged(tmp_path) -> None:
    plain = Module()
    quiet_fit(plain, loader(), tmp_path / "plain", [], max_steps=3)
    module = Module()
    monitor = WeightSpectraMonitor(every_n_steps=2, max_expert_keys=2)
    quiet_fit(module, loader(), tmp_path / "monitored", [monitor], max_steps=3)
    # observation only: the same weights as the fit without the monitor, bit for bit
    for (name, p), q in zip(module.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    rows = read_metrics(tmp_path / "monitored")
    # the baseline, step 2, and the end of training (step 3)
    assert sorted(logged(rows, "weights/ffn/w_gate/alpha/mean")) == [0, 2, 3]
    w_in, w_out = module.model.ffn.w_in.detach(), module.model.ffn.w_out.detach()
    matrices = {"w_gate": w_in[..., :H], "w_up": w_in[..., H:], "w_out": w_out}
    for matrix, weight_E in matrices.items():
        alphas = [alpha_of(weight_E[e]) for e in range(E)]
        assert logged(rows, f"weights/ffn/{matrix}/alpha/mean")[3] == pytest.approx(sum(alphas) / E, rel=1e-12)
        assert logged(rows, f"weights/ffn/{matrix}/alpha/e1")[3] == pytest.approx(alphas[1], rel=1e-12)
        norm = torch.linalg.matrix_norm(weight_E[0].double(), ord=2)
        assert logged(rows, f"weights/ffn/{matrix}/spectral_norm/e0")[3] == pytest.approx(float(norm), rel=1e-12)
    assert "weights/ffn/w_gate/alpha/e2" not in rows[0]  # past max_expert_keys
    assert "weights/ffn/w_gate/alpha/mean_stderr" in rows[0] and "weights/ffn/w_out/stable_rank/mean" in rows[0]
    assert monitor.state_dict()["measured_steps"] == [0, 2, 3]


@dataclass
class SimulatedRanks(Ranks):
    """Rank ``rank`` of ``world_size`` in one process: :meth:`sum` records what this rank sends and returns
    ``total`` (the other ranks' records summed with this one's), as ``all_reduce`` would."""

    sent: list = field(default_factory=list)
    others: list = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return True

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor.clone())
        return tensor + sum(self.others, torch.zeros_like(tensor))


def test_experts_split_over_ranks_sum_to_one_process() -> None:
    torch.manual_seed(0)
    model = Net()
    one = WeightSpectraProbe(at_start=True).start(model, 0, Ranks())
    world = 3
    views = find_moe_layers(model)
    shares = [measured_experts(views[0], Ranks(rank, world)) for rank in range(world)]
    assert sorted(e for share in shares for e in share) == list(range(E))  # each expert on exactly one rank

    def probe_on(ranks: Ranks) -> dict[str, float]:
        probe = WeightSpectraProbe()
        probe.find_layers(model, Ranks())  # the layers alike on every rank; the measurement's one sum simulated
        return probe.start(model, 0, ranks)

    sent = []
    for rank in range(1, world):
        ranks = SimulatedRanks(rank, world)
        probe_on(ranks)
        sent += ranks.sent
    assert len(sent) == world - 1  # one collective per measurement
    summed = probe_on(SimulatedRanks(0, world, others=sent))
    assert set(summed) == set(one)
    for key, value in one.items():  # a sum of one value and zeros: exact
        assert summed[key] == value, key


def test_nonfinite_weights_have_no_key_and_one_warning() -> None:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.ffn.w_out[1, 0, 0] = math.inf
    probe = WeightSpectraProbe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = probe.start(model, 0)
        probe.measure(model, 1)
    messages = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    assert len(messages) == 1 and "ffn w_out of experts 1" in messages[0]
    assert "weights/ffn/w_out/spectral_norm/e1" not in values and "weights/ffn/w_out/spectral_norm/e0" in values
    finite = [alpha_of(model.ffn.w_out[e].detach()) for e in (0, 2, 3)]
    assert values["weights/ffn/w_out/alpha/mean"] == pytest.approx(sum(finite) / 3, rel=1e-12)


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightSpectraMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="max_expert_keys"):
        WeightSpectraProbe(max_expert_keys=-1)
