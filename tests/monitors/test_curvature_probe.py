"""CurvatureProbe outside Lightning: the model's own loss of a dict batch (as a Hugging Face model computes it from its
labels) against the exact Hessian of a least-squares loss, and the set-ups it refuses with one warning while training
goes on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from moe_lightning.monitors import CurvatureProbe

X, Y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.randn(32, 2)


class Regressor(nn.Module):
    """A linear model that returns its loss when the batch holds targets, as a Hugging Face model does with labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        out = self.linear(x)
        return {"logits": out, "loss": None if y is None else nn.functional.mse_loss(out, y)}


def test_the_models_own_loss_of_a_dict_batch_gives_the_exact_hessian_and_the_log_gets_it():
    model, logged = Regressor(), {}

    def log(values: dict[str, float], step: int) -> None:
        logged[step] = values

    probe = CurvatureProbe(every_n_steps=2, trace=False, density=False, eigen_max_iter=10, eigen_tol=1e-10, log=log)
    assert probe.take_batch(model, {"x": X, "y": Y}) == logged[0]  # the baseline, at step 0
    assert probe(model, 1) == {} and probe(model, 2) == logged[2]  # every second step
    # mse over (N, 2) outputs: H = (2 / (2N)) * kron(I_2, [X 1]^T [X 1]); its top eigenvalue is the Gram matrix's
    X1 = np.concatenate([X.numpy().astype(np.float64), np.ones((32, 1))], axis=1)
    expected = np.linalg.eigvalsh(X1.T @ X1 / 32).max()
    assert logged[2]["curvature/hessian_top_eigenvalue"] == pytest.approx(expected, rel=1e-4)
    assert probe.computed_steps == [0, 2] and probe.end(model, 2) == {}  # step 2 is done already


def test_what_it_cannot_measure_is_one_warning_and_nothing_logged():
    model = Regressor()
    # a tuple batch, no loss method and no loss_fn: nothing to differentiate, said when the batch is taken
    probe = CurvatureProbe(every_n_steps=1, density=False)
    with pytest.warns(UserWarning, match=r"taking the batch failed.*pass loss_fn=lambda model, batch"):
        assert probe.take_batch(model, (X, Y)) == {}
    assert probe.disabled and probe.batch is None and probe(model, 1) == {} and probe.computed_steps == []
    # a dict batch without targets: the model returns no loss; one warning for two steps, no values
    probe = CurvatureProbe(every_n_steps=1, density=False, at_start=False)
    probe.take_batch(model, {"x": X})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe(model, 1) == {} and probe(model, 2) == {}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "returned no loss; put labels in the batch" in messages[0], messages
    assert probe.computed_steps == [1, 2] and probe.logged_step is None
    with pytest.raises(ValueError, match="CurvatureProbe: full_model=False needs param_groups"):
        CurvatureProbe(full_model=False)
