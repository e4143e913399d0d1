"""What the geometry probe's singular values cost, by every LAPACK route, and how far each route's values move the
statistics the probe reports (results: docs/benchmarks/callbacks.md, "The spectra's floor").

The probe of ``configs/transformer/wikitext_topk.yaml`` (3 MoE layers, D = H = 128, 8 experts, top-2, 256 probe
tokens) takes the singular values of 768 Jacobians a layer: each routed expert's at each of its tokens (512) and the
layer's at every token (256), ``torch.linalg.svdvals`` in float64 (LAPACK ``gesdd``). This script forms those
Jacobians for the first MoE layer of the model (at initialisation, or after ``--train-steps`` steps), and times,
side by side, one thread, the fastest of ``--repeats``:

- ``gesdd float64``: what the probe runs;
- ``gesdd float32``: the same routine on float32 copies;
- ``Gram + syevd float64`` and ``float32``: the eigenvalues of ``JᵀJ`` (formed in float64), square roots.

For each route it prints the largest error of the token means the probe reports (``sigma_max``, ``frobenius``,
``stable_rank``, ``effective_rank``, ``decay_slope``, and each index of the mean spectrum) in units of that mean's
standard error over the tokens (``std / √n``, per expert and for the layer; the largest over them; plain means over
each expert's routed tokens, where the probe weights them by the gates), against ``gesdd float64``; and what the
spectra alone would cost at the shipped cadence (every 200 steps), the route's time for all 3 layers' Jacobians
over 200 training steps measured in the same run.

Usage:
    python scripts/benchmark_spectra.py                      # at initialisation
    python scripts/benchmark_spectra.py --train-steps 200    # after 200 training steps
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_callbacks as bench  # noqa: E402 - the callbacks benchmark's model, data and training loop

from moe_lightning.adapters import find_moe_layers  # noqa: E402
from moe_lightning.adapters.capture import capture_layer_inputs  # noqa: E402
from moe_lightning.geometry import layer_jacobian  # noqa: E402
from moe_lightning.geometry.jacobians import expert_jacobian  # noqa: E402
from moe_lightning.geometry.spectra import spectral_stats  # noqa: E402

CADENCE = 200  # the shipped WikiText configs' every_n_steps
TOKENS = 256  # their max_tokens


def _gram_route(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def singular_values(J: Tensor) -> Tensor:
        eigenvalues = torch.linalg.eigvalsh((J.mT @ J).to(dtype)).to(torch.float64)
        return eigenvalues.clamp_min(0).sqrt().flip(-1)

    return singular_values


ROUTES: dict[str, Callable[[Tensor], Tensor]] = {
    "gesdd float64 (the probe's)": torch.linalg.svdvals,
    "gesdd float32": lambda J: torch.linalg.svdvals(J.float()).double(),
    "Gram + syevd float64": _gram_route(torch.float64),
    "Gram + syevd float32": _gram_route(torch.float32),
}


def probe_jacobians(module: torch.nn.Module, batch: Tensor) -> tuple[list[Tensor], int]:
    """The float64 Jacobians the probe takes the spectra of, for the first MoE layer: one ``(n, D, D)`` group per
    expert (its routed probe tokens) and one for the layer (every probe token); and the number of MoE layers."""
    model = copy.deepcopy(module).double()
    views = find_moe_layers(model.model)
    view = views[0]
    x = capture_layer_inputs(model, [view], [batch])[view.name]
    x = x.reshape(-1, x.shape[-1])[:TOKENS]
    with torch.no_grad():
        gates = view.gates(x)
        groups = [expert_jacobian(view, e, x[gates[:, e] != 0]) for e in range(view.num_experts)]
        groups.append(layer_jacobian(view, x))
    return [g for g in groups if g.shape[0] > 1], len(views)


def _error(ours: Tensor, exact: Tensor) -> float:
    """``|mean(ours) − mean(exact)|`` over the standard error of ``mean(exact)``, the tokens where both are finite
    (as the probe leaves a NaN slope out); the largest over the last dimension, if any (the mean spectrum)."""
    keep = torch.isfinite(ours) & torch.isfinite(exact)
    if ours.dim() > 1:
        keep = keep.all(-1, keepdim=True).expand_as(ours)
    n = keep.sum(0).clamp_min(2)
    ours, exact = torch.where(keep, ours, 0.0), torch.where(keep, exact, 0.0)
    mean = exact.sum(0) / n
    se = (((exact - mean) ** 2 * keep).sum(0) / (n - 1) / n).sqrt().clamp_min(torch.finfo(exact.dtype).tiny)
    return float(((ours.sum(0) - exact.sum(0)).abs() / n / se).max())


def error_in_standard_errors(groups: list[Tensor], reference: list[Tensor]) -> dict[str, float]:
    """For each reported statistic, the largest error of its token mean in standard errors (:func:`_error`) over
    the groups."""
    worst: dict[str, float] = {}
    for values, exact in zip(groups, reference, strict=True):
        ours, theirs = spectral_stats(values), spectral_stats(exact)
        errors = {name: _error(ours[name], theirs[name]) for name in theirs}
        errors["mean spectrum (worst index)"] = _error(values, exact)
        for name, error in errors.items():
            worst[name] = max(worst.get(name, 0.0), error)
    return worst


def timed(route: Callable[[Tensor], Tensor], groups: list[Tensor], repeats: int) -> tuple[float, list[Tensor]]:
    """Seconds per Jacobian (the fastest of ``repeats``) and the route's singular values of every group."""
    best, out = float("inf"), []
    count = sum(g.shape[0] for g in groups)
    for _ in range(repeats):
        start = time.process_time()
        out = [route(g) for g in groups]
        best = min(best, time.process_time() - start)
    return best / count, out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=0, help="train this many steps first (default: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: CPU time is the time the work takes on it
    bench.CLOCK = time.process_time
    config = bench.load_config()
    os.chdir(bench.ROOT)
    data = bench.WikiTextDataModule(**config["data"]["init_args"])
    data.prepare_data()
    data.setup("fit")
    # The model to probe, and the training step of this run (one thread, CPU time): measured on the steps that train
    # it, or on 20 steps of another copy when it is probed at initialisation.
    module = bench.build(config, args.seed)
    trained = module if args.train_steps else None
    step = bench.run_variant("none", config, data, args.train_steps or 20, args.seed, module=trained)["step"]
    batch, _ = next(iter(data.train_dataloader()))
    groups, layers = probe_jacobians(module, batch)
    count = sum(g.shape[0] for g in groups)
    print(
        f"first MoE layer after {args.train_steps} steps: {count} Jacobians {tuple(groups[0].shape[1:])} in "
        f"{len(groups)} groups; training step {step * 1e3:.1f} ms (1 thread, CPU time)"
    )
    reference = [torch.linalg.svdvals(g) for g in groups]
    results: dict[str, dict[str, float]] = {}
    base = None
    for name, route in ROUTES.items():
        seconds, values = timed(route, groups, args.repeats)
        base = base or seconds
        errors = error_in_standard_errors(values, reference)
        share = seconds * count * layers / (CADENCE * step)
        results[name] = {"ms_per_jacobian": seconds * 1e3, "share_at_shipped_cadence": share, **errors}
        worst = max(errors, key=errors.get)
        print(
            f"  {name:28s} {seconds * 1e3:6.3f} ms a Jacobian ({seconds / base:4.2f}x)  spectra alone every "
            f"{CADENCE} steps: {share * 100:4.2f}% of training  worst error {errors[worst]:.1e} SE ({worst})"
        )
    return results


if __name__ == "__main__":
    main()
