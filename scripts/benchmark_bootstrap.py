"""Time the probe's bootstrap over probe tokens (``ProbeConfig.bootstrap``) against the plain probe and against the
literal way, one plain probe per resample on the repeated tokens, on the MoE layers of the sweep presets.

The bootstrap adds each token's contributions to ``B`` replicas of the resampled sums (one GEMM of the ``(B, n)``
counts per chunk and slot) and finalises each replicate (eigendecompositions of the PCA covariances), but computes
the Jacobians once; the literal way recomputes everything ``B`` times. The literal time is measured on a few
resamples and scaled to ``B``.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.geometry.bootstrap import resample_counts
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig, TransformerMoE, TransformerMoEConfig

# name -> (model, model dim, tokens probed): the MoE layers of mlp_small and transformer_small, with about as many
# tokens as their probe sets hold for top-k routing (docs/sweeps.md).
LAYERS = {
    "mlp_small topk (D=64, E=8, H=64, GELU)": (
        lambda routing: MLPMoE(MLPMoEConfig(routing=routing, input_dim=32, output_dim=32, dim=64, expert_hidden=64)),
        64,
        768,
    ),
    "transformer_small topk (D=128, E=8, H=128, SwiGLU)": (
        lambda routing: TransformerMoE(
            TransformerMoEConfig(
                routing=routing, vocab_size=256, dim=128, num_layers=1, expert_hidden=128, activation="swiglu"
            )
        ),
        128,
        1024,
    ),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicates", type=int, default=200, help="B (the presets' value)")
    parser.add_argument("--literal", type=int, default=3, help="resamples probed the literal way (scaled to B)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens and B = 20")
    args = parser.parse_args()
    replicates = 20 if args.quick else args.replicates
    print(f"== Probe with and without the bootstrap (B = {replicates}, float64, {torch.get_num_threads()} threads) ==")
    print(f"{'layer':52s} {'tokens':>6s} {'plain s':>8s} {'boot s':>8s} {'boot/plain':>10s} {'literal s':>10s} "
          f"{'literal/boot':>12s}")  # fmt: skip
    for name, (build, dim, n_tokens) in LAYERS.items():
        n_tokens = n_tokens // 4 if args.quick else n_tokens
        torch.manual_seed(0)
        view = find_moe_layers(build("topk"))[0]
        x = torch.randn(n_tokens, dim, dtype=torch.float64)
        plain_cfg, boot_cfg = ProbeConfig(), ProbeConfig(bootstrap=replicates)
        probe(view, x[:16], plain_cfg)  # warm-up
        plain = timed(lambda view=view, x=x, cfg=plain_cfg: probe(view, x, cfg))
        boot = timed(lambda view=view, x=x, cfg=boot_cfg: probe(view, x, cfg))
        resampled = [x.repeat_interleave(c.long(), dim=0) for c in resample_counts(n_tokens, args.literal, 0)]
        literal = sum(timed(lambda view=view, r=r, cfg=plain_cfg: probe(view, r, cfg)) for r in resampled)
        literal *= replicates / args.literal
        print(f"{name:52s} {n_tokens:6d} {plain:8.2f} {boot:8.2f} {boot / plain:9.1f}x {literal:10.1f} "
              f"{literal / boot:11.1f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
