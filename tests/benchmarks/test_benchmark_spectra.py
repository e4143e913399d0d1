"""scripts/benchmark_spectra.py at a tiny size: each route gives the singular values of well-conditioned matrices,
and its errors are counted in standard errors of the token means, as numpy counts them. No time is checked."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_spectra.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_every_route_gives_the_singular_values_of_well_conditioned_matrices(bench):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, 12, 12, dtype=torch.float64, generator=g) + 6 * torch.eye(12, dtype=torch.float64)
    exact = np.linalg.svd(J.numpy(), compute_uv=False)
    for name, route in bench.ROUTES.items():
        tolerance = 1e-5 if "float32" in name else 1e-12
        np.testing.assert_allclose(route(J).numpy(), exact, rtol=tolerance, err_msg=name)


def test_errors_are_counted_in_standard_errors_of_the_token_means(bench):
    g = torch.Generator().manual_seed(1)
    exact = [torch.rand(n, 6, dtype=torch.float64, generator=g).sort(-1, descending=True).values + 0.1 for n in (40, 9)]
    scaled = [s * 1.001 for s in exact]  # every value 0.1% larger: the ranks and the slope do not move
    got = bench.error_in_standard_errors(scaled, exact)

    def in_standard_errors(values: np.ndarray) -> np.ndarray:  # 0.1% of the mean, over std / sqrt(n)
        return 1e-3 * np.abs(values.mean(0)) / (values.std(0, ddof=1) / np.sqrt(values.shape[0]))

    arrays = [s.numpy() for s in exact]
    assert got["sigma_max"] == pytest.approx(max(float(in_standard_errors(a[:, 0])) for a in arrays), rel=1e-9)
    frobenius = [np.sqrt((a**2).sum(1)) for a in arrays]
    assert got["frobenius"] == pytest.approx(max(float(in_standard_errors(f)) for f in frobenius), rel=1e-9)
    worst_index = max(float(in_standard_errors(a).max()) for a in arrays)
    assert got["mean spectrum (worst index)"] == pytest.approx(worst_index, rel=1e-9)
    for name in ("stable_rank", "effective_rank", "decay_slope"):
        assert got[name] < 1e-9, name
    assert set(bench.error_in_standard_errors(exact, exact).values()) == {0.0}
