"""Smoke run of scripts/benchmark_geometry.py at tiny shapes: every row printed, and the accuracy it reports is
checked against the float64 SVD the script measures against."""

from pathlib import Path

import pytest
import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_geometry.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def _rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("=="):
            break
        rows.append(line.split())
    return rows


def test_exact_jacobian_table(bench, capsys):
    bench.exact_jacobian_table((16,), n_tokens=lambda d: 3, n_loop=lambda d: 1, dtype=torch.float64, repeats=1)
    rows = _rows(capsys.readouterr().out, "expert")
    assert [(r[0], r[1]) for r in rows] == [("gelu", "16"), ("swiglu", "16")]
    assert [r[2] for r in rows] == ["64", "42"]  # H = 4·D for GELU, 8·D/3 for SwiGLU
    for r in rows:  # ratios and rates are positive numbers
        assert float(r[6].rstrip("x")) > 0 and float(r[7].rstrip("x")) > 0 and float(r[8]) > 0
        assert float(r[11].rstrip("x")) > 0  # jacrev's time over the plain matmul's


def test_matrix_free_table_reports_accurate_values(bench, capsys):
    """D = 64 random and decaying SwiGLU weights, 1 and 2 tokens, closed-form and torch.func products."""
    bench.matrix_free_table(64, 128, 4, torch.float32, 8, 60, [1e-5], [0.0, 1.0], [1, 2])
    rows = _rows(capsys.readouterr().out, "w_down")
    # per decay: closed x (1, 2 tokens) + func x 1 token, one tolerance
    assert len(rows) == 2 * 3
    labels = [" ".join(r[:-12]) for r in rows]
    assert labels == ["random init"] * 3 + ["rows·(i+1)^-1"] * 3
    for r in rows:
        lapack_err, products, tokens, cols, rel_err = float(r[-10]), r[-9], int(r[-8]), int(r[-4]), float(r[-3])
        assert 0 < float(r[-1].rstrip("%")) <= 100  # share of the call's time in the products
        assert products in ("closed", "func") and tokens in (1, 2)
        assert 4 <= cols <= 64  # the Krylov basis: at least r columns, at most D
        assert lapack_err < 1e-5  # float32 LAPACK vs float64 on the same J
        assert rel_err < 1e-4  # the matrix-free values at tol 1e-5, against the float64 SVD
