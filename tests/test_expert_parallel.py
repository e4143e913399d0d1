"""Expert parallelism and FSDP2 on CPU over gloo, against one process: 10 training steps of a tiny transformer with
the ep_cpu.yaml and fsdp.yaml strategies, the EP=2 checkpoint resumed with EP=1 and EP=2, GeometryMonitor under EP=2
(exact and matrix-free paths, bootstrap, the torch.func layer Jacobian) and the MoE layer's forward and backward on
the same 2 ranks (tests/scripts/ep_training.py, one launch); and on 4 ranks, EP=2 with two replicas of each expert,
EP=4, the probe with two expert groups and the layer."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import column, read_metrics, run_test_script

from moe_lightning.callbacks import CurvatureMonitor
from moe_lightning.distributed.layout import clip_grad_norm_
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.lightning.strategy import ExpertParallelStrategy
from moe_lightning.nn.models import MLPMoEConfig

LAYER_CASES = ["topk_sorted", "topk_grouped", "topk_loop", "topk_empty_expert", "soft_sorted", "soft_grouped"]


def check_layer_result(result: dict, world: int) -> None:
    for case in LAYER_CASES:
        for quantity, error in result[case].items():
            if quantity != "empty_experts":
                assert error <= 1e-6, (case, quantity, error)
    assert result["topk_empty_expert"]["empty_experts"] == 1  # the case has an expert that gets no token
    assert "must be divisible by the expert-parallel size" in result["indivisible"]
    assert f"num_experts=3 must be divisible by the expert-parallel size {world}" in result["parallelize_indivisible"]
    assert result["parallelize_left_unchanged"]


@pytest.mark.integration  # four gloo processes
def test_four_ranks_match_one_process(tmp_path):
    run_test_script("ep_training.py", tmp_path, tmp_path, extra=["4"])
    losses = json.loads((tmp_path / "losses.json").read_text())
    # EP=2 keeps two replicas of every expert, sharded by FSDP2 over them (their gradients summed over the
    # replicas, then divided); EP=4 has one copy of each.
    for run in ("ep2", "ep4"):
        assert losses[run] == pytest.approx(losses["single"], abs=1e-5), run
    check_router(losses["router"])
    check_weight_spectra(losses["weights"])
    check_probes(json.loads((tmp_path / "geometry.json").read_text()))
    check_layer_result(json.loads((tmp_path / "layer.json").read_text()), world=4)


#: The report keys of the matrix-free estimates (docs/geometry.md §1, "Estimated quantities").
# Above the threshold: what comes of float32 products (the estimates, and the layer's top-r values; the experts'
# spectra there come from their exact factored cores).
ESTIMATED = re.compile(r"/(layer_)?jac_(frobenius|stable_rank|effective_rank)|/layer_jac_(sigma_max|decay_slope)")


def check_probes(probes: dict) -> None:
    """GeometryMonitor under EP=2 equals one process's probe of the same model on the same tokens; it probes each
    expert on its rank (no rank gathers a layer's experts) unless the layer Jacobian runs through torch.func."""
    for case, result in probes.items():
        ep, one = result["ep"], result["single"]
        if case == "topk_matrix_free":
            # Above the threshold the alignment and functional subspaces of factored experts need every expert's
            # weights on one rank, which expert parallelism splits: they are one process's only (docs/geometry.md §1).
            cross = ("/align_", "/palign_", "/subspace_fun_")
            assert any(c in k for k in one for c in cross) and not any(c in k for k in ep for c in cross)
            one = {k: v for k, v in one.items() if not any(c in k for c in cross)}
        last_expert = "e0" if case == "dense" else "e3"  # every expert's statistics, whichever rank holds it
        assert set(ep) == set(one) and any(f"/jac_sigma_max/{last_expert}" in k for k in one), case
        for key, value in one.items():
            if math.isnan(value):
                assert math.isnan(ep[key]), (case, key)
            elif case == "topk_matrix_free" and ESTIMATED.search(key):
                # The matrix-free products round in float32 (ProbeConfig.matrix_free_products_dtype), and the
                # expert group sums them in another order than one process: equal to float32's rounding, four
                # orders of magnitude below their standard errors and spreads.
                assert ep[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (case, key)
            else:
                assert ep[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (case, key)
        assert (result["gathers"] > 0) == (case == "topk_func"), (case, result["gathers"])
    if "topk_bootstrap" in probes:
        assert sum(k.startswith("bootstrap/") for k in probes["topk_bootstrap"]["single"]) > 100
    if "topk_matrix_free" in probes:
        assert any("layer_jac_unconverged" in k for k in probes["topk_matrix_free"]["single"])


def check_weight_spectra(weights: dict) -> None:
    """Each run's weight spectra of the initial weights (the same in every run) equal one process's, whichever ranks
    hold which experts or shards."""
    single = weights.pop("single")
    assert any(k.endswith("/alpha/mean") for k in single) and any("/alpha/e" in k for k in single)
    for run, values in weights.items():
        assert values.keys() == single.keys(), run
        for key, value in single.items():
            assert values[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (run, key)


def check_router(router: dict) -> None:
    """Expert parallelism logs what one process logs, and the overload of each of its ranks, which is the share of
    the loads one process logs on that rank's experts over the mean share."""
    ep = dict(router["ep"])
    overload = {k: ep.pop(k) for k in list(ep) if "/ep_overload" in k}
    assert set(ep) == set(router["single"]) and "router/blocks.0.ffn/load/e3" in router["single"]
    layers = {k.rpartition("/ep_overload")[0] for k in overload if k.endswith("/ep_overload_max")}
    layers -= {"router/mean"}  # the mean over the layers, beside each layer's value
    assert "router/blocks.0.ffn" in layers
    for layer in layers:
        ranks = sum(k.startswith(f"{layer}/ep_overload/r") for k in overload)
        experts = sum(k.startswith(f"{layer}/load/e") for k in router["single"])
        loads = [router["single"][f"{layer}/load/e{e}"] for e in range(experts)]
        per_rank = [sum(loads[r * len(loads) // ranks : (r + 1) * len(loads) // ranks]) for r in range(ranks)]
        expected = [share / (sum(per_rank) / ranks) for share in per_rank]
        got = [overload[f"{layer}/ep_overload/r{r}"] for r in range(ranks)]
        assert ranks > 1 and got == pytest.approx(expected, rel=1e-6), layer
        assert overload[f"{layer}/ep_overload_max"] == pytest.approx(max(expected), rel=1e-6), layer
    for key, value in router["single"].items():
        if "_micro" in key:  # a per-micro-batch statistic is each rank's batch's by definition, not the union's
            continue
        assert router["ep"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.integration  # two gloo processes
def test_training_checkpoints_and_probes_match_one_process(tmp_path):
    run_test_script("ep_training.py", tmp_path, tmp_path)
    losses = json.loads((tmp_path / "losses.json").read_text())
    single = losses["single"]
    assert len(single) == 10
    for run in ("ep2", "fsdp"):
        assert losses[run] == pytest.approx(single, abs=1e-5), run
    for run in ("resume_ep1", "resume_ep2"):  # resumed at step 5 from the EP=2 checkpoint
        assert losses[run] == pytest.approx(single[5:], abs=1e-5), run
    assert single[-1] < single[0] - 0.1  # it trains
    # The MoE layer's output lives in its own storage, so FSDP2's pre-backward hook cannot be dropped by an
    # in-place op on a view (nor does FSDP2 warn about one).
    assert losses["view_warnings"] == []
    check_router(losses["router"])
    check_weight_spectra(losses["weights"])
    probes = json.loads((tmp_path / "geometry.json").read_text())
    failing = probes.pop("failing")  # the probe fails on rank 1 only: both ranks skip it and training goes on
    assert failing["reports"] == [] and failing["steps"] == 2
    # Two layers, each failed on rank 1; rank 0 received NaN from rank 1 in the layer Jacobian. One warning, on rank
    # zero, gives both ranks' errors.
    assert failing["warnings"][1] == [] and len(failing["warnings"][0]) == 1
    (message,) = failing["warnings"][0]
    assert "on rank 1: RuntimeError('expert function failed on rank 1')" in message
    assert "on rank 0: " in message and "another rank of the expert group failed" in message
    assert set(probes) == {
        *("topk", "soft", "deepseek", "dense"),
        *("topk_matrix_free", "topk_bootstrap", "topk_func", "topk_block_sharded"),
    }
    assert any(".shared_experts/jac_sigma_max" in key for key in probes["deepseek"]["single"])
    check_probes(probes)
    check_layer_result(json.loads((tmp_path / "layer.json").read_text()), world=2)  # the layer on 2 ranks


def test_clip_grad_norm_matches_torch_on_one_mesh():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a) * 4
        b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, 1.0)
    reference = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.item() == pytest.approx(reference.item(), rel=1e-6) and reference.item() > 1.0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [0, -2, 1.5])
def test_strategy_rejects_a_bad_expert_parallel_size(size):
    with pytest.raises(ValueError, match="expert_parallel_size"):
        ExpertParallelStrategy(expert_parallel_size=size)


def test_curvature_monitor_turns_itself_off_under_model_parallel():
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ExpertParallelStrategy(1), logger=False)
    module = MLPMoEModule(MLPMoEConfig(input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=2))
    monitor = CurvatureMonitor()
    with pytest.warns(UserWarning, match="setting up failed.*ModelParallelStrategy.*Training goes on"):
        monitor.setup(trainer, module, "fit")
    assert monitor.disabled


def test_probe_statistics_rejects_an_incomplete_or_whole_layer_expert_shard():
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import ProbeConfig, probe_statistics

    module = MLPMoEModule(MLPMoEConfig(input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=2))
    (view,) = find_moe_layers(module.model)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="expert_group and local_experts together"):
        probe_statistics(view, x, expert_group=object())
    with pytest.raises(ValueError, match=r"local_experts=range\(1, 3\) must lie within the view's 2 experts"):
        probe_statistics(view, x, expert_group=object(), local_experts=range(1, 3))
    with pytest.raises(ValueError, match="layer_jacobian_method='func'"):
        cfg = ProbeConfig(layer_jacobian_method="func")
        probe_statistics(view, x, cfg, expert_group=object(), local_experts=range(0, 1))


ROOT = Path(__file__).resolve().parents[1]
# fsdp.yaml and fsdp_ep.yaml name all GPUs in bf16; on CPU: two gloo processes in float32
ON_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.strategy.init_args.process_group_backend=gloo",
    "--trainer.precision=32-true",
]
MODEL = "--model.init_args.config"
PRESETS = {"ep_cpu.yaml": [], "fsdp.yaml": ON_CPU, "fsdp_ep.yaml": ON_CPU}
CONFIGS = ("wikitext_topk.yaml", "wikitext_soft.yaml", "wikitext_dense.yaml", "wikitext_deepseek.yaml")


def preset_overrides(preset: str, config: str) -> list[str]:
    """What a preset needs on CPU, and 16 routed experts for the DeepSeek-style config under expert parallelism
    (its 15 do not split over 2 ranks)."""
    split = preset != "fsdp.yaml" and config == "wikitext_deepseek.yaml"
    return [*PRESETS[preset], *([f"{MODEL}.num_experts=16"] if split else [])]


def run_cli(tmp_path: Path, preset: str, config: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """``moe-lightning fit --config <config> --config <preset>`` for 3 steps on a slice of the bundled WikiText-2,
    from a folder outside the checkout, logging to CSV under ``tmp_path``."""
    args = [
        *("--config", str(ROOT / "configs" / "transformer" / config)),
        *("--config", str(ROOT / "configs" / "trainer" / preset)),
        "--trainer.max_steps=3",
        "--trainer.max_epochs=-1",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--summary=false",
        "--data.init_args.max_train_tokens=4000",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.vocab_size=320",
        f"{MODEL}.vocab_size=320",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "moe_lightning", "fit", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


# Each CLI run takes half a minute: the default suite runs fsdp_ep with the DeepSeek-style config (sigmoid scores,
# aux-free bias, a shared expert, under FSDP2 x EP); the other pairs are slow, since the tests above train every
# routing under ep_cpu.yaml's and fsdp.yaml's strategies against one process.
DEFAULT_RUN = ("fsdp_ep.yaml", "wikitext_deepseek.yaml")
PRESET_RUNS = [
    pytest.param(preset, config, marks=[] if (preset, config) == DEFAULT_RUN else [pytest.mark.slow])
    for preset in PRESETS
    for config in CONFIGS
]


@pytest.mark.integration  # `moe-lightning fit` on two gloo processes
@pytest.mark.parametrize(("preset", "config"), PRESET_RUNS)
def test_presets_train_the_shipped_transformer_configs(preset, config, tmp_path):
    overrides = preset_overrides(preset, config)
    result = run_cli(tmp_path, preset, config, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path)
    losses = column(rows, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert column(rows, "val/loss")
    # The fit-start probe of every FFN (and of the shared experts) counts each of its 256 probe tokens once over
    # all ranks, and k times over its experts for top-k routing (the sums of every rank's expert shards).
    model = yaml.safe_load((ROOT / "configs" / "transformer" / config).read_text())["model"]["init_args"]["config"]
    num_experts = 16 if f"{MODEL}.num_experts=16" in overrides else model["num_experts"]
    routed = {  # (experts, how many of them each token reaches)
        "topk": (num_experts, model["top_k"]),
        "soft": (num_experts, num_experts),
        "dense": (1, 1),  # one FFN, as one expert
    }[model["routing"]]
    views = {"ffn": routed, "ffn.shared_experts": (1, 1) if model.get("num_shared_experts") else None}
    for name, (experts, k) in ((n, v) for n, v in views.items() if v is not None):
        for block in range(model["num_layers"]):
            prefix = f"geometry/blocks.{block}.{name}"
            assert column(rows, f"{prefix}/tokens_total")[0] == 256, prefix
            assert sum(column(rows, f"{prefix}/tokens/e{e}")[0] for e in range(experts)) == 256 * k, prefix
            assert math.isfinite(column(rows, f"{prefix}/jac_sigma_max/mean")[0]), prefix


@pytest.mark.slow  # parallelize's ValueError itself is checked on 2 and 4 ranks above (check_layer_result)
def test_a_preset_names_the_expert_count_it_cannot_split(tmp_path):
    # The DeepSeek-style config's 15 routed experts under ep_cpu.yaml's 2 ranks: every rank stops with the error.
    result = run_cli(tmp_path, "ep_cpu.yaml", "wikitext_deepseek.yaml", [])
    assert result.returncode != 0
    assert "num_experts=15 must be divisible by the expert-parallel size 2" in result.stderr
