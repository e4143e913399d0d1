"""Benchmark of the experts-interface adapter's Jacobian paths on a DeepSeek-V3 MoE block (results:
docs/benchmarks/hf-experts.md).

Builds one random ``DeepseekV3MoE`` block of transformers (sigmoid scoring, bias-corrected group-limited top-k,
routed scaling, one shared expert), views it with ``moe_lightning.adapters.hf_experts`` and times
``moe_lightning.geometry.probe`` on the same tokens, side by side in one run, with the expert Jacobians from the
closed form (``ProbeConfig(jacobian_method="closed_form")``) and from ``torch.func``
(``jacobian_method="func"``), for the routed view and the shared-expert view; and, alone, the expert Jacobians of
every expert at the tokens routed to it by both paths. It prints the ratios and the largest relative difference
between the two reports' per-expert top singular values.

Usage:
    python scripts/benchmark_hf_experts.py            # D = 128 and 256, 64 tokens (minutes on 2 cores)
    python scripts/benchmark_hf_experts.py --quick    # D = 64, 64 tokens, seconds
    python scripts/benchmark_hf_experts.py --threads 1  # one torch thread (steadier on a shared machine)
"""

from __future__ import annotations

import argparse
import functools

import torch
from benchmark_geometry import best_time  # scripts/ is on the path of a script run from it

from moe_lightning.adapters.hf_experts import experts_interface_views
from moe_lightning.geometry import ProbeConfig, jacobians, probe


def deepseek_v3_block(dim: int, num_experts: int, top_k: int, seed: int = 0) -> torch.nn.Module:
    """A random DeepSeek-V3 MoE block: expert width dim/4, 4 expert groups of which 2 are searched."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=dim,
        moe_intermediate_size=dim // 4,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        initializer_range=0.2,
    )
    config._experts_implementation = "eager"  # a block outside a model: its experts run their own forward
    torch.manual_seed(seed)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 1.0 / dim**0.5)
        block.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return block


def expert_jacobians(view, x: torch.Tensor, gates: torch.Tensor, closed: bool) -> list[torch.Tensor]:
    """Every expert's Jacobians at the tokens routed to it: the view's closed form, or ``torch.func``."""
    out = []
    with torch.no_grad():  # as in the probe
        for e in range(view.num_experts):
            x_e = x[gates[:, e] != 0]
            out.append(view.expert_jacobian(e, x_e) if closed else jacobians(view.expert(e), x_e))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [(64, 8, 2)] if args.quick else [(128, 16, 4), (256, 16, 4)]
    tokens, repeats = (64, 1) if args.quick else (64, 2)
    print(f"== one DeepSeek-V3 MoE block, {tokens} tokens, float64, {torch.get_num_threads()} threads; seconds ==")
    print(
        f"{'view':<8}{'D':>6}{'E':>5}{'k':>3}{'jac closed':>12}{'jac func':>10}{'ratio':>7}"
        f"{'probe closed':>14}{'probe func':>12}{'ratio':>7}{'max rel diff':>14}",
        flush=True,
    )
    rows = []
    for dim, num_experts, top_k in sizes:
        block = deepseek_v3_block(dim, num_experts, top_k)
        views = experts_interface_views("mlp", block)
        x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        block.double()
        for view in views:
            with torch.no_grad():
                gates = view.gates(x)
            jac = {
                closed: best_time(functools.partial(expert_jacobians, view, x, gates, closed), repeats)
                for closed in (True, False)
            }
            reports, times = {}, {}
            for method in ("closed_form", "func"):
                cfg = ProbeConfig(jacobian_method=method, layer_jacobian=False, pca=False, subspaces=False)
                times[method] = best_time(functools.partial(probe, view, x, cfg), repeats)
                reports[method] = probe(view, x, cfg)
            a, b = reports["closed_form"].expert["jac_sigma_max"], reports["func"].expert["jac_sigma_max"]
            seen = ~torch.isnan(a)
            diff = float(((a - b).abs() / b.abs())[seen].max())
            label = "routed" if view.num_experts > 1 else "shared"
            ratio = times["func"] / times["closed_form"]
            print(
                f"{label:<8}{dim:>6}{view.num_experts:>5}{top_k if view.num_experts > 1 else 1:>3}"
                f"{jac[True]:>12.3f}{jac[False]:>10.3f}{jac[False] / jac[True]:>6.1f}x"
                f"{times['closed_form']:>14.3f}{times['func']:>12.3f}{ratio:>6.1f}x{diff:>14.1e}",
                flush=True,
            )
            rows.append(
                {"view": label, "dim": dim, "jac_ratio": jac[False] / jac[True], "ratio": ratio, "max_rel_diff": diff}
            )
    return rows


if __name__ == "__main__":
    main()
