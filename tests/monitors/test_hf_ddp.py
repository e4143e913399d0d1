"""The monitors under the Hugging Face Trainer's DDP, launched with ``torchrun --nproc_per_node 2`` (two gloo processes
on CPU): the values logged are those of one process on the union of both ranks' batches and on the whole probe set
(the curvature's: on rank zero's batch), and both ranks end in the weights they end in without the monitors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face Trainer needs transformers: pip install -e .[hf]")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate: pip install -e .[hf]")

from helpers import hf_monitor_values, load_script, run_test_script, tiny_hf_model  # noqa: E402

from moe_lightning.monitors import CurvatureProbe, GeometryProbe, RouterProbe  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hf_ddp.py"


def one_process_values(script, run: dict, union: list[torch.Tensor]) -> dict[int, dict[str, float]]:
    """In one process, on the weights of ``run`` at each step: the geometry probe of the whole probe set and the
    curvature of rank zero's batch (with an SGD of the trainer's rate) after each step (0 is the baseline), and the
    router window of each step's batches of both ranks together (``union``)."""
    values: dict[int, dict[str, float]] = {}
    weights = {**run["weights"], script.STEPS: run["final"]}
    for step, state in sorted(weights.items()):
        model = tiny_hf_model("qwen3_moe", **script.CONFIG)
        model.load_state_dict(state)
        geometry = GeometryProbe(**script.GEOMETRY)
        geometry.take_probe_set(model, script.PROBE, baseline=False)
        geometry.probe(model, step)
        values[step] = dict(geometry.last_values)
        curvature = CurvatureProbe(**script.CURVATURE)
        curvature.take_batch(model, script.curvature_batch(0), baseline=False)
        values[step].update(curvature.compute(model, step, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
        if step == script.STEPS:
            continue
        router = RouterProbe(every_n_steps=1)
        router.attach(model)
        router.start_batch(step)
        with torch.no_grad():
            model.train()(input_ids=union[step], labels=union[step])
        values[step].update(router.end_batch(model, step + 1))
        router.detach()
    return values


@pytest.mark.integration  # two gloo processes, started by torchrun
def test_hf_trainer_ddp_logs_one_process_on_the_union_and_keeps_the_ranks_in_sync(tmp_path):
    run_test_script("hf_ddp.py", tmp_path, tmp_path, torchrun=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    script = load_script(SCRIPT)
    # the ranks trained on different rows: the values below need both ranks' batches
    assert not torch.equal(ranks[0]["batches"][0], ranks[1]["batches"][0])
    union = [torch.cat([ranks[0]["batches"][s], ranks[1]["batches"][s]]) for s in range(script.STEPS)]
    expected = one_process_values(script, ranks[0], union)
    for rank in ranks:
        logged = hf_monitor_values(rank["log_history"])  # every rank logs, as the trainer logs its loss
        assert sorted(logged) == sorted(expected) == [0, 1, 2]
        for step, values in expected.items():
            assert sorted(logged[step]) == sorted(values), step
            assert "geometry/model.layers.1.mlp/jac_sigma_max/mean" in values and "curvature/hessian_trace" in values
            for key, value in values.items():
                if "_micro" in key:  # a per-micro-batch statistic is each rank's batch's by definition, not the union's
                    continue
                assert logged[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    # the same weights on both ranks at every step and at the end, and the same as without the monitors
    for name, value in ranks[0]["final_without_monitors"].items():
        for rank in ranks:
            assert torch.equal(rank["final"][name], value), name
            assert torch.equal(rank["final_without_monitors"][name], value), name
    for step, state in ranks[0]["weights"].items():
        for name, value in state.items():
            assert torch.equal(ranks[1]["weights"][step][name], value), (step, name)
