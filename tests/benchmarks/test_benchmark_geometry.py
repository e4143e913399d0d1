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
    """The table's shape, and what each column means in terms of the times the run measured: the measured values
    themselves depend on the machine and its load, so none is checked against a bound."""
    measured = bench.exact_jacobian_table(
        (16,), n_tokens=lambda d: 3, n_loop=lambda d: 1, dtype=torch.float64, repeats=1
    )
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("expert"))
    assert header.split() == [
        "expert", "D", "H", "closed", "ms", "jacrev", "ms", "loop", "ms",
        "vs", "jacrev", "vs", "loop", "GFLOP/s", "matmul", "%", "mm", "ceiling",
    ]  # fmt: skip
    rows = _rows(out, "expert")
    assert [r[:3] for r in rows] == [["gelu", "16", "64"], ["swiglu", "16", "42"]]  # H = 4·D (GELU), 8·D/3 (SwiGLU)
    assert all(len(r) == 12 for r in rows)
    for r, m in zip(rows, measured, strict=True):
        assert (m["kind"], m["d"], m["h"]) == (r[0], int(r[1]), int(r[2]))
        assert m["flops"] == 2 * 16 * 16 * m["h"]  # the one (D, H) @ (H, D) GEMM that forms J, per token
        gflops_closed, gflops_mm = m["flops"] / m["closed_s"] / 1e9, m["flops"] / m["mm_s"] / 1e9
        printed = {  # column: (printed value, what it stands for, half a unit of its last printed digit)
            "closed ms": (r[3], m["closed_s"] * 1e3, 0.005),
            "jacrev ms": (r[4], m["jacrev_s"] * 1e3, 0.005),
            "loop ms": (r[5], m["loop_s"] * 1e3, 0.05),
            "vs jacrev": (r[6].rstrip("x"), m["jacrev_s"] / m["closed_s"], 0.05),
            "vs loop": (r[7].rstrip("x"), m["loop_s"] / m["closed_s"], 0.05),
            "GFLOP/s": (r[8], gflops_closed, 0.05),
            "matmul": (r[9], gflops_mm, 0.05),
            "% mm": (r[10].rstrip("%"), 100 * gflops_closed / gflops_mm, 0.5),
            "ceiling": (r[11].rstrip("x"), m["jacrev_s"] / m["mm_s"], 0.05),
        }
        for column, (text, value, half_unit) in printed.items():
            assert float(text) == pytest.approx(value, abs=half_unit * 1.001), (m["kind"], column)


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
        assert 0 <= float(r[-1].rstrip("%")) <= 100  # share of the call's time spent in the products
        assert products in ("closed", "func") and tokens in (1, 2)
        assert 4 <= cols <= 64  # the Krylov basis: at least r columns, at most D
        assert lapack_err < 1e-5  # float32 LAPACK vs float64 on the same J
        assert rel_err < 1e-4  # the matrix-free values at tol 1e-5, against the float64 SVD
