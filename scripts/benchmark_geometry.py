"""Benchmark of the geometry core's Jacobian paths (results: docs/benchmarks/geometry.md).

Times, side by side in one run, on a GELU-MLP expert and a SwiGLU expert at D = 256 and D = 1024:
  - the closed-form Jacobian (moe_lightning.geometry.{mlp,swiglu}_expert_jacobian),
  - vmap(jacrev) through moe_lightning.geometry.jacobians(mode="jacrev"),
  - a per-token loop of torch.autograd.functional.jacobian,
and the achieved GFLOP/s of the closed form against a plain matmul of the same GEMM shape measured in the same run,
with the ceiling of "vs jacrev": jacrev's time over that matmul's, the ratio a method forming J with one GEMM of
2·D²·H flops per token would reach at the plain matmul's speed.
Then, at D = 4096 (Mixtral-8x7B: H = 14336), the matrix-free top-16 singular values of SwiGLU Jacobians against
forming one token's J (closed form) and taking its full SVD, with the closed-form products
(swiglu_jacobian_operator) and the torch.func ones (func_jacobian_operator), at two tolerances, for random weights
(flat top spectrum) and for weights with power-law decaying scales; for 1, 8 and 32 tokens in one call (as the
probe batches a chunk's tokens: they share every GEMM against the weights; from 8 tokens on, the Krylov blocks are
4 columns per token), timed per token, with the Krylov basis size (cols) and the share of the time spent in the
products (prod %): the rest is orthogonalisation, Ritz values and set-up. Errors of both methods are against the
float64 SVD of the same J (token 0).

Usage:
    python scripts/benchmark_geometry.py            # full run (a few minutes on a 2-core CPU)
    python scripts/benchmark_geometry.py --quick    # smaller sizes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian as autograd_jacobian

from moe_lightning.geometry import (
    JacobianOperator,
    func_jacobian_operator,
    jacobians,
    mlp_expert_jacobian,
    swiglu_expert_jacobian,
    swiglu_jacobian_operator,
    topr_singular_values,
)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_expert(kind: str, d: int, h: int, dtype: torch.dtype, gen: torch.Generator):
    if kind == "gelu":
        w_in = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
        b_in = torch.randn(h, generator=gen, dtype=dtype) * 0.1
        w_out = torch.randn(h, d, generator=gen, dtype=dtype) / h**0.5

        def fn(x):
            return F.gelu(x @ w_in + b_in) @ w_out

        def closed(x):
            return mlp_expert_jacobian(x, w_in, b_in, w_out, "gelu", memory_budget_bytes=2**31)

        return fn, closed, 2 * d * d * h  # the (D, H) @ (H, D) GEMM per token
    w_gate = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_up = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_down = torch.randn(h, d, generator=gen, dtype=dtype) / h**0.5

    def fn(x):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    def closed(x):
        return swiglu_expert_jacobian(x, w_gate, w_up, w_down, memory_budget_bytes=2**31)

    return fn, closed, 2 * d * d * h  # the (D, H) @ (H, D) GEMM w_downᵀ M(x) per token


def exact_jacobian_table(sizes, n_tokens, n_loop, dtype, repeats) -> list[dict]:
    """Print the exact-Jacobian table; return its rows: expert kind, D, H, the GEMM's flops per token and the
    measured seconds per token (closed form, jacrev, loop, plain matmul) that the printed columns are made of."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"\n== Exact per-token Jacobians ({dtype}, {torch.get_num_threads()} threads); times are per token ==")
    header = (
        f"{'expert':7} {'D':>5} {'H':>6} {'closed ms':>10} {'jacrev ms':>10} {'loop ms':>10} "
        f"{'vs jacrev':>9} {'vs loop':>8} {'GFLOP/s':>8} {'matmul':>8} {'% mm':>5} {'ceiling':>8}"
    )
    print(header)
    for kind in ("gelu", "swiglu"):
        for d in sizes:
            h = 4 * d if kind == "gelu" else 8 * d // 3
            fn, closed, flops = make_expert(kind, d, h, dtype, gen)
            n = n_tokens(d)
            x = torch.randn(n, d, generator=gen, dtype=dtype)
            t_closed = best_time(lambda closed=closed, x=x: closed(x), repeats) / n
            t_jacrev = best_time(lambda fn=fn, x=x: jacobians(fn, x, mode="jacrev", memory_budget_bytes=2**31), repeats)
            t_jacrev /= n
            xl = x[: n_loop(d)]

            def loop(fn=fn, xl=xl):
                return [autograd_jacobian(lambda xi, fn=fn: fn(xi.unsqueeze(0)).squeeze(0), xi) for xi in xl]

            t_loop = best_time(loop, 1) / len(xl)
            a = torch.randn(n * d, h, generator=gen, dtype=dtype)  # the same GEMM for all n tokens at once
            b = torch.randn(h, d, generator=gen, dtype=dtype)
            t_mm = best_time(lambda a=a, b=b: a @ b, repeats) / n
            gf_closed, gf_mm = flops / t_closed / 1e9, flops / t_mm / 1e9
            print(
                f"{kind:7} {d:5d} {h:6d} {t_closed * 1e3:10.2f} {t_jacrev * 1e3:10.2f} {t_loop * 1e3:10.1f} "
                f"{t_jacrev / t_closed:8.1f}x {t_loop / t_closed:7.1f}x {gf_closed:8.1f} {gf_mm:8.1f} "
                f"{100 * gf_closed / gf_mm:4.0f}% {t_jacrev / t_mm:7.1f}x"
            )
            rows.append(
                dict(kind=kind, d=d, h=h, flops=flops, closed_s=t_closed, jacrev_s=t_jacrev, loop_s=t_loop, mm_s=t_mm)
            )
    return rows


def swiglu_weights(d: int, h: int, dtype: torch.dtype, gen: torch.Generator, decay: float):
    """Random SwiGLU weights; ``decay > 0`` scales output row ``i`` of ``w_downᵀ`` by ``(i + 1)^-decay``.

    Random init gives the flat top spectrum of a random matrix (σ_17/σ_16 ≈ 0.995 at D = 4096), the worst case for
    any iterative method; a power-law scale gives the decaying spectrum trained weights tend to have.
    """
    w_gate = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_up = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_down = torch.randn(h, d, generator=gen, dtype=dtype) / h**0.5
    if decay > 0:
        w_down = w_down * torch.arange(1, d + 1, dtype=dtype).pow(-decay)
    return w_gate, w_up, w_down


def timed(op: JacobianOperator) -> tuple[JacobianOperator, list[float]]:
    """``op`` with its products timed: the second value accumulates the seconds spent inside them."""
    spent = [0.0]

    def clocked(product):
        def run(block):
            t0 = time.perf_counter()
            out = product(block)
            spent[0] += time.perf_counter() - t0
            return out

        return run

    wrapped = dataclasses.replace(op, apply=clocked(op.apply), apply_transpose=clocked(op.apply_transpose))
    return wrapped, spent


def matrix_free_table(d, h, r, dtype, oversample, max_iter, tols, decays, token_counts):
    print(f"\n== Top-{r} singular values of SwiGLU Jacobians, D={d}, H={h} ({dtype}), oversample {oversample} ==")
    print(
        f"{'w_down':16} {'form J s':>8} {'SVD s':>6} {'SVD err':>8} {'products':>9} {'tokens':>6} {'tol':>6} "
        f"{'s/token':>8} {'iters':>5} {'cols':>4} {'rel err':>8} {'vs form+SVD':>11} {'prod %':>6}"
    )
    for decay in decays:
        gen = torch.Generator().manual_seed(1)
        w_gate, w_up, w_down = swiglu_weights(d, h, dtype, gen, decay)
        x = torch.randn(max(token_counts), d, generator=gen, dtype=dtype)
        t0 = time.perf_counter()
        J = swiglu_expert_jacobian(x[:1], w_gate, w_up, w_down)
        t_form = time.perf_counter() - t0
        t0 = time.perf_counter()
        lapack = torch.linalg.svdvals(J)[0, :r]
        t_svd = time.perf_counter() - t0
        truth = torch.linalg.svdvals(J.double())[0, :r]  # errors are measured against float64 (not timed)
        del J

        def rel_err(values, truth=truth):
            return ((values.double() - truth).abs() / truth).max().item()

        def expert(x, w_gate=w_gate, w_up=w_up, w_down=w_down):
            return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

        label = "random init" if decay == 0 else f"rows·(i+1)^-{decay:g}"
        operators = {  # built inside the timed region: their set-up (activations, linearize's trace) counts
            "closed": swiglu_jacobian_operator,
            "func": lambda x, *w: func_jacobian_operator(expert, x),
        }
        for name, make in operators.items():
            for n in token_counts if name == "closed" else token_counts[:1]:
                for tol in tols:
                    t0 = time.perf_counter()
                    op, spent = timed(make(x[:n], w_gate, w_up, w_down))
                    res = topr_singular_values(op, None, r, oversample=oversample, max_iter=max_iter, tol=tol)
                    elapsed = time.perf_counter() - t0
                    t_mf = elapsed / n
                    print(
                        f"{label:16} {t_form:8.2f} {t_svd:6.2f} {rel_err(lapack):8.1e} {name:>9} {n:6d} {tol:6.0e} "
                        f"{t_mf:8.2f} {res.iterations:5d} {res.basis_columns:4d} {rel_err(res.values[0]):8.1e} "
                        f"{(t_form + t_svd) / t_mf:10.1f}x {100 * spent[0] / elapsed:5.0f}%"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (D=64/128, matrix-free D=1024)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="exact-Jacobian dtype")
    parser.add_argument("--mf-dtype", choices=["float64", "float32"], default="float32", help="D=4096 dtype")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mf-tol", type=float, nargs="+", default=[1e-6, 1e-3], help="matrix-free tolerances")
    parser.add_argument("--mf-max-iter", type=int, default=30)
    parser.add_argument("--mf-oversample", type=int, default=8, help="as ProbeConfig.matrix_free_oversample")
    parser.add_argument(
        "--mf-decay", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="power-law row scales of w_downᵀ"
    )
    parser.add_argument(
        "--mf-tokens", type=int, nargs="+", default=[1, 8, 32], help="tokens per matrix-free call (they share GEMMs)"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.quick:
        sizes, mf = (64, 128), (1024, 3584)
    else:
        sizes, mf = (256, 1024), (4096, 14336)
    exact_jacobian_table(
        sizes,
        n_tokens=lambda d: 32 if d <= 256 else 4,
        n_loop=lambda d: 4 if d <= 256 else 1,
        dtype=dtype,
        repeats=args.repeats,
    )
    matrix_free_table(
        *mf,
        16,
        getattr(torch, args.mf_dtype),
        args.mf_oversample,
        args.mf_max_iter,
        args.mf_tol,
        args.mf_decay,
        args.mf_tokens,
    )


if __name__ == "__main__":
    main()
