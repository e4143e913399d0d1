"""Benchmark of the loss-curvature estimators (results: docs/benchmarks/curvature.md).

Side by side in one run, on the soft-routed MLP-MoE of configs/mlp/soft.yaml (256 samples, MSE) and the WikiText
transformer of configs/transformer/wikitext_soft.yaml (a few 128-token sequences), both with the task loss only
(no auxiliary losses, so that the other libraries see the same loss):
  - top Hessian eigenvalue: our Lanczos (moe_lightning.geometry.hessian_eigenvalues) at the CurvatureMonitor
    default and tighter, power iteration (the method Lanczos replaced in CurvatureMonitor) at a few settings, the
    power iteration products needed to reach 1e-3, curvlinops' HessianLinearOperator with scipy's eigsh, and PyHessian's
    power iteration (each if installed);
  - trace: Hutch++ and Hutchinson at equal budget (spread over seeds), and PyHessian's Hutchinson;
  - the SLQ density at the monitor default.
It prints time, Hessian-vector products (HVPs) and the relative error against the best reference: the tight
Lanczos value (residual ≤ 1e-8 · |λ|) for the eigenvalue, a 900-product Hutch++ for the trace.

Usage:
    python scripts/benchmark_curvature.py                 # both problems (a few minutes on a 2-core CPU)
    python scripts/benchmark_curvature.py --quick         # the MLP-MoE only, fewer trace budgets
    python scripts/benchmark_curvature.py --problem wikitext
    python scripts/benchmark_curvature.py --figure PATH   # also train the MLP-MoE and draw the density over training
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_lightning.geometry import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hutchinson,
    hutchpp,
)
from moe_lightning.lightning.modules import CausalLMModule, MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig, TransformerMoEConfig


def mlp_problem():
    torch.manual_seed(0)
    config = MLPMoEConfig(
        routing="soft", input_dim=32, output_dim=32, dim=64, expert_hidden=64, num_experts=8, top_k=2, num_blocks=1,
        activation="gelu", capacity_match="total",
    )  # fmt: skip
    module = MLPMoEModule(config, task="regression", load_balance_coef=0.0, z_loss_coef=0.0).eval()
    from moe_lightning.data import SyntheticMoEDataModule

    data = SyntheticMoEDataModule(num_clusters=8, input_dim=32, output_dim=32, num_train=256, batch_size=256, seed=0)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    return module, (x, y), (lambda out: out.output), F.mse_loss


def wikitext_problem(sequences: int):
    torch.manual_seed(0)
    config = TransformerMoEConfig(
        routing="soft", vocab_size=4096, dim=128, num_layers=3, num_heads=4, max_seq_len=128, expert_hidden=128,
        num_experts=8, top_k=2, activation="swiglu", capacity_match="total", dropout=0.0,
    )  # fmt: skip
    module = CausalLMModule(config, load_balance_coef=0.0, z_loss_coef=0.0).eval()
    from moe_lightning.data import WikiTextDataModule

    data = WikiTextDataModule(
        train_file="bundled:wikitext-2/valid.txt",
        val_file="bundled:wikitext-2/test.txt",
        vocab_size=4096,
        block_size=128,
        batch_size=sequences,
    )
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))

    def ce(logits, targets):
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    return module, (x, y), (lambda out: out.logits if hasattr(out, "logits") else out.output), ce


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def power_estimates(op: HessianOperator, cap: int, seed: int = 0) -> Iterator[float]:
    """Power iteration ``v ← H v / ‖H v‖`` from a seeded Gaussian start: the Rayleigh quotient ``vᵀ H v`` of the unit
    vector after each of at most ``cap`` products (PyHessian's estimate of the dominant eigenvalue)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.dim, generator=gen, dtype=op.dtype)
    v /= v.norm()
    for _ in range(cap):
        hv = op(v)
        yield float(v @ hv)
        norm = hv.norm()
        if norm == 0:  # H v = 0: v is an eigenvector of eigenvalue 0
            return
        v = hv / norm


def power_iteration(op: HessianOperator, max_iter: int, tol: float) -> tuple[float, int, bool]:
    """``(value, products, converged)`` of power iteration stopped at a relative change ``≤ tol``."""
    value, it = math.nan, 0
    for it, new in enumerate(power_estimates(op, max_iter), 1):
        if it > 1 and abs(new - value) <= tol * max(abs(new), 1e-300):
            return new, it, True
        value = new
    return value, it, False


def power_hvps_to(op: HessianOperator, reference: float, rel: float, cap: int) -> tuple[int, float]:
    """Products of power iteration until its estimate is within ``rel`` of ``reference`` (-1: not within ``cap``)."""
    t0 = time.perf_counter()
    for it, value in enumerate(power_estimates(op, cap), 1):
        if abs(value - reference) <= rel * abs(reference):
            return it, time.perf_counter() - t0
    return -1, time.perf_counter() - t0


def curvlinops_eigsh(module, batch, output_of, criterion, params):
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh
    except ImportError as error:
        return None, f"not installed ({error.__class__.__name__})"

    op = HessianLinearOperator(
        _Predict(module, output_of), _LossModule(criterion), params, [batch], check_deterministic=False
    )
    op = op.to_scipy()
    count = [0]
    base = op.matvec

    def counting(v):
        count[0] += 1
        return base(v)

    from scipy.sparse.linalg import LinearOperator

    wrapped = LinearOperator(op.shape, matvec=counting, dtype=op.dtype)
    (value, _), seconds = timed(lambda: eigsh(wrapped, k=1, which="LA", tol=1e-6))
    return (float(value[0]), count[0], seconds), ""


class _Predict(torch.nn.Module):
    """The module's predictions as a plain forward (the other libraries differentiate ``model(x)``)."""

    def __init__(self, module, output_of):
        super().__init__()
        self.inner, self.output_of = module, output_of

    def forward(self, x):
        return self.output_of(self.inner(x))


class _LossModule(torch.nn.Module):
    """A loss function as the module the other libraries expect (curvlinops reads ``reduction``)."""

    reduction = "mean"

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


def pyhessian_runs(module, batch, output_of, criterion):
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as error:
        return None, f"not installed ({error.__class__.__name__})"

    comp = PyHessian(_Predict(module, output_of), _LossModule(criterion), data=batch, cuda=False)
    (eig, _), eig_s = timed(lambda: comp.eigenvalues(maxIter=100, tol=1e-3, top_n=1))
    trace, tr_s = timed(lambda: comp.trace(maxIter=100, tol=1e-3))
    module.zero_grad(set_to_none=True)
    return (float(eig[0]), eig_s, float(np.mean(trace)), len(trace), tr_s), ""


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run_problem(
    name: str,
    module,
    batch,
    output_of,
    criterion,
    trace_ref_budget: int,
    seeds: int,
    budgets=(30,),
    power_settings=((20, 1e-3), (100, 1e-6), (400, 1e-8)),
    power_cap: int = 1000,
) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    x, y = batch

    def loss():
        return criterion(output_of(module(x)), y)

    P = sum(p.numel() for p in params)
    op0 = HessianOperator(loss, params)
    v = torch.randn(P)
    _, hvp_s = timed(lambda: [op0(v) for _ in range(5)])
    print(f"\n## {name}: P = {P:,}, batch {tuple(x.shape)}, one HVP {1000 * hvp_s / 5:.1f} ms\n")
    ref, ref_s = timed(lambda: hessian_eigenvalues(loss, params, k=1, max_iter=300, tol=1e-8))
    lam = float(ref.eigenvalues[0])
    print("| top eigenvalue | value | HVPs | time (s) | rel. error | converged |")
    print("| --- | --- | --- | --- | --- | --- |")
    row(
        "reference: our Lanczos, tol 1e-8",
        f"{lam:.6f}",
        f"{ref.iterations}",
        f"{ref_s:.2f}",
        "0",
        f"{ref.all_converged}",
    )
    double = copy.deepcopy(module).double()
    d_params = [p for p in double.parameters() if p.requires_grad]
    xd = x.double() if x.is_floating_point() else x

    def loss64():
        return criterion(output_of(double(xd)), y.double() if y.is_floating_point() else y)

    r64, s = timed(lambda: hessian_eigenvalues(loss64, d_params, k=1, max_iter=300, tol=1e-10))
    v64 = float(r64.eigenvalues[0])
    row(
        "check: our Lanczos in float64, tol 1e-10",
        f"{v64:.6f}",
        f"{r64.iterations}",
        f"{s:.2f}",
        f"{rel(v64, lam):.1e}",
        "",
    )
    for label, it, tol, which in (
        ("ours: Lanczos, monitor default (30 steps, tol 1e-3, both ends)", 30, 1e-3, "both"),
        ("ours: Lanczos, top only, tol 1e-3", 30, 1e-3, "largest"),
        ("ours: Lanczos, top only, tol 1e-5", 100, 1e-5, "largest"),
    ):
        r, s = timed(
            lambda it=it, tol=tol, which=which: hessian_eigenvalues(loss, params, max_iter=it, tol=tol, which=which)
        )
        row(
            f"{label}",
            f"{float(r.eigenvalues[0]):.6f}",
            f"{r.iterations}",
            f"{s:.2f}",
            f"{rel(float(r.eigenvalues[0]), lam):.1e}",
            f"{r.all_converged}",
        )
    for it, tol in power_settings:
        (value, products, converged), s = timed(
            lambda it=it, tol=tol: power_iteration(HessianOperator(loss, params), max_iter=it, tol=tol)
        )
        row(
            f"old power iteration, {it} iterations, tol {tol:g}",
            f"{value:.6f}",
            f"{products}",
            f"{s:.2f}",
            f"{rel(value, lam):.1e}",
            f"{converged}",
        )
    n, s = power_hvps_to(HessianOperator(loss, params), lam, 1e-3, cap=1000)
    row("old power iteration, run until within 1e-3", f"| {n if n > 0 else '>1000'}", f"{s:.2f}", "≤1e-3 |")
    try:
        found, why = curvlinops_eigsh(module, batch, output_of, criterion, params)
    except Exception as error:  # e.g. forward-mode AD missing for an op of the model
        found, why = None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:90]}"
    if found:
        value, count, s = found
        row(
            "curvlinops HessianLinearOperator + scipy eigsh (tol 1e-6)",
            f"{value:.6f}",
            f"{count}",
            f"{s:.2f}",
            f"{rel(value, lam):.1e} |",
        )
    else:
        row("curvlinops + scipy eigsh", f"{why}", "|", "|")
    try:
        py, why = pyhessian_runs(module, batch, output_of, criterion)
    except Exception as error:
        py, why = None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:90]}"
    if py:
        row(
            "PyHessian power iteration (maxIter 100, tol 1e-3)",
            f"{py[0]:.6f}",
            "≤100",
            f"{py[1]:.2f}",
            f"{rel(py[0], lam):.1e} |",
        )
    else:
        row("PyHessian", f"{why}", "|", "|")

    trace_ref, s = timed(lambda: hessian_trace(loss, params, num_matvecs=trace_ref_budget, seed=123))
    print()
    row(
        f"trace ({seeds} seeds each)",
        "mean",
        "spread (std over seeds)",
        "rel. error of mean",
        "time per estimate (s)",
    )
    print("| --- | --- | --- | --- | --- |")
    row(
        f"reference: Hutch++ with {trace_ref_budget} HVPs",
        f"{trace_ref.trace:.4f}",
        f"std error {trace_ref.std_error:.4f}",
        "0",
        f"{s:.2f}",
    )
    op = HessianOperator(loss, params)
    for budget in budgets:
        for label, estimator in (
            (f"Hutch++, {budget} HVPs", lambda sd, b=budget: hutchpp(op, P, num_matvecs=b, seed=sd)),
            (f"Hutchinson, {budget} HVPs", lambda sd, b=budget: hutchinson(op, P, max_iter=b, tol=0.0, seed=sd)),
        ):
            values, s = timed(lambda estimator=estimator: [estimator(sd).trace for sd in range(seeds)])
            mean, spread = float(np.mean(values)), float(np.std(values, ddof=1))
            row(
                f"{label}",
                f"{mean:.4f}",
                f"{spread:.4f} ({spread / abs(trace_ref.trace):.1%})",
                f"{rel(mean, trace_ref.trace):.1e}",
                f"{s / seeds:.2f}",
            )
    if py:
        row(
            "PyHessian Hutchinson (maxIter 100, tol 1e-3)",
            f"{py[2]:.4f}",
            f"{py[3]} samples",
            f"{rel(py[2], trace_ref.trace):.1e}",
            f"{py[4]:.2f}",
        )
    dens, s = timed(lambda: hessian_spectral_density(loss, params, num_starts=2, num_steps=30))
    print(
        f"\nSLQ density (monitor default: 2 starts × 30 steps): {dens.matvecs} HVPs, {s:.2f} s; "
        f"nodes span [{float(dens.nodes.min()):.4f}, {float(dens.nodes.max()):.4f}]; "
        f"P·moment(1) = {P * dens.moment(1):.3f} vs trace reference {trace_ref.trace:.3f}"
    )


def density_figure(path: str, steps: int = 400, every: int = 100) -> None:
    """Train the soft MLP-MoE (configs/mlp/soft.yaml model, synthetic data) with CurvatureMonitor; plot densities."""
    import json
    import tempfile
    from pathlib import Path

    import lightning as L
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import CSVLogger

    from moe_lightning.callbacks import CurvatureMonitor
    from moe_lightning.data import SyntheticMoEDataModule

    L.seed_everything(0)
    config = MLPMoEConfig(
        routing="soft", input_dim=32, output_dim=32, dim=64, expert_hidden=64, num_experts=8, top_k=2, num_blocks=1,
        activation="gelu", capacity_match="total",
    )  # fmt: skip
    module = MLPMoEModule(config, task="regression", lr=0.002)
    data = SyntheticMoEDataModule(num_clusters=8, input_dim=32, output_dim=32, batch_size=128, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        logger = CSVLogger(tmp)
        monitor = CurvatureMonitor(every_n_steps=every, density_starts=4, density_steps=40, density_grid=301)
        L.Trainer(max_steps=steps, logger=logger, callbacks=[monitor], enable_checkpointing=False,
                  enable_progress_bar=False, limit_val_batches=0).fit(module, data)  # fmt: skip
        files = sorted((Path(logger.log_dir) / "curvature").glob("step_*.json"))
        reports = [json.loads(f.read_text()) for f in files]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for report in reports:
        d = report["densities"]["curvature"]
        ax.semilogy(d["grid"], np.maximum(d["density"], 1e-6), label=f"step {report['step']}")
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian σ = 1% of range)")
    ax.set_title("soft MLP-MoE (configs/mlp/soft.yaml): Hessian spectral density over training", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path} ({len(reports)} densities)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("mlp", "wikitext", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="the MLP-MoE only, trace budgets 30 and 90")
    parser.add_argument("--sequences", type=int, default=2, help="WikiText sequences of 128 tokens in the batch")
    parser.add_argument("--figure", help="also train the MLP-MoE and save the density-over-training figure here")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.problem in ("mlp", "both") or args.quick:
        budgets = (30, 90) if args.quick else (30, 90, 300)
        run_problem("MLP-MoE (configs/mlp/soft.yaml)", *mlp_problem(), trace_ref_budget=900, seeds=10, budgets=budgets)
    if args.problem in ("wikitext", "both") and not args.quick:
        # double backward needs the math attention kernel (the fused ones have no second derivative)
        with sdpa_kernel([SDPBackend.MATH]):
            run_problem(
                "WikiText transformer (configs/transformer/wikitext_soft.yaml)",
                *wikitext_problem(args.sequences),
                trace_ref_budget=150,
                seeds=3,
                power_settings=((20, 1e-3), (100, 1e-6)),
                power_cap=300,
            )
    if args.figure:
        density_figure(args.figure)


if __name__ == "__main__":
    main()
