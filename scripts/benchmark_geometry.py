"""Benchmark of the geometry core's Jacobian paths (issue 4, "What must be shown: a benchmark").

Times, side by side in one run, on a GELU-MLP expert and a SwiGLU expert at D = 256 and D = 1024:
  - the closed-form Jacobian (moe_lightning.geometry.{mlp,swiglu}_expert_jacobian),
  - vmap(jacrev) through moe_lightning.geometry.jacobians(mode="jacrev"),
  - a per-token loop of torch.autograd.functional.jacobian,
and the achieved GFLOP/s of the closed form against a plain matmul of the same GEMM shape measured in the same run.
Then, at D = 4096 (Mixtral-8x7B: H = 14336), the matrix-free top-16 singular values of one token's SwiGLU Jacobian
against forming J and taking its full SVD.

Usage:
    python scripts/benchmark_geometry.py            # full run (a few minutes on a 2-core CPU)
    python scripts/benchmark_geometry.py --quick    # smaller sizes, seconds
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian as autograd_jacobian

from moe_lightning.geometry import jacobians, mlp_expert_jacobian, swiglu_expert_jacobian, topr_singular_values


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

        return fn, closed, 2 * d * d * h  # the (N·D, H) @ (H, D) GEMM per token
    w_gate = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_up = torch.randn(d, h, generator=gen, dtype=dtype) / d**0.5
    w_down = torch.randn(h, d, generator=gen, dtype=dtype) / h**0.5

    def fn(x):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    def closed(x):
        return swiglu_expert_jacobian(x, w_gate, w_up, w_down, memory_budget_bytes=2**31)

    return fn, closed, 4 * d * d * h  # the (N·D, 2H) @ (2H, D) GEMM per token


def exact_jacobian_table(sizes, n_tokens, n_loop, dtype, repeats):
    gen = torch.Generator().manual_seed(0)
    print(f"\n== Exact per-token Jacobians ({dtype}, {torch.get_num_threads()} threads); times are per token ==")
    header = (
        f"{'expert':7} {'D':>5} {'H':>6} {'closed ms':>10} {'jacrev ms':>10} {'loop ms':>10} "
        f"{'vs jacrev':>9} {'vs loop':>8} {'GFLOP/s':>8} {'matmul':>8} {'% mm':>5}"
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
            k = 2 if kind == "swiglu" else 1
            a = torch.randn(n * d, k * h, generator=gen, dtype=dtype)
            b = torch.randn(k * h, d, generator=gen, dtype=dtype)
            t_mm = best_time(lambda a=a, b=b: a @ b, repeats) / n
            gf_closed, gf_mm = flops / t_closed / 1e9, flops / t_mm / 1e9
            print(
                f"{kind:7} {d:5d} {h:6d} {t_closed * 1e3:10.2f} {t_jacrev * 1e3:10.2f} {t_loop * 1e3:10.1f} "
                f"{t_jacrev / t_closed:8.1f}x {t_loop / t_closed:7.1f}x {gf_closed:8.1f} {gf_mm:8.1f} "
                f"{100 * gf_closed / gf_mm:4.0f}%"
            )


def matrix_free_table(d, h, r, dtype, oversample, max_iter, tol):
    gen = torch.Generator().manual_seed(1)
    fn, closed, _ = make_expert("swiglu", d, h, dtype, gen)
    x = torch.randn(1, d, generator=gen, dtype=dtype)
    print(f"\n== Top-{r} singular values of one SwiGLU Jacobian, D={d}, H={h} ({dtype}) ==")
    t0 = time.perf_counter()
    J = closed(x)
    t_form = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = torch.linalg.svdvals(J)[0, :r]
    t_svd = time.perf_counter() - t0
    del J
    t0 = time.perf_counter()
    res = topr_singular_values(fn, x, r, oversample=oversample, max_iter=max_iter, tol=tol)
    t_mf = time.perf_counter() - t0
    err = ((res.values[0] - exact).abs() / exact).max().item()
    est = (res.error_estimate[0] / res.values[0]).max().item()
    print(f"form J (closed form): {t_form:8.2f} s")
    print(f"full SVD of J:        {t_svd:8.2f} s")
    print(
        f"matrix-free top-{r}:   {t_mf:8.2f} s  ({res.iterations} iterations, oversample {oversample}, tol {tol:g}, "
        f"converged={bool(res.converged.all())})"
    )
    print(f"max relative error vs exact: {err:.2e}   (residual estimate: {est:.2e})")
    print(f"speed-up matrix-free vs form+SVD: {(t_form + t_svd) / t_mf:.1f}x   (vs SVD alone: {t_svd / t_mf:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (D=64/128, matrix-free D=1024)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="exact-Jacobian dtype")
    parser.add_argument("--mf-dtype", choices=["float64", "float32"], default="float32", help="D=4096 dtype")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mf-tol", type=float, default=1e-6)
    parser.add_argument("--mf-max-iter", type=int, default=30)
    parser.add_argument("--mf-oversample", type=int, default=16)
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
    matrix_free_table(*mf, 16, getattr(torch, args.mf_dtype), args.mf_oversample, args.mf_max_iter, args.mf_tol)


if __name__ == "__main__":
    main()
