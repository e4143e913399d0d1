"""Smoke run of scripts/benchmark_moe.py at tiny shapes: implementations agree, table and JSON are complete."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_moe.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def report(bench):
    return bench.run_benchmark(tokens=[48], shapes=[(4, 2)], dim=16, hidden=32, repeats=1, log=lambda _: None)


def test_same_weights_give_the_same_function(bench):
    # Independent reference: the SwiGLU Mixtral MoE written out token by token from our layer's weights.
    impls, _ = bench.build_implementations(4, 2, 16, 32, torch.device("cpu"), torch.float32)
    layer = impls["ours_loop"][0]
    x = torch.randn(10, 16)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    weight, index = probs.topk(2, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for n in range(10):
        for j in range(2):
            e = index[n, j]
            gate, up = (x[n] @ layer.w_in[e]).chunk(2)
            expected[n] += weight[n, j] * ((torch.nn.functional.silu(gate) * up) @ layer.w_out[e])
    for name, (_, fn) in impls.items():
        if name != "dense":
            torch.testing.assert_close(fn(x), expected, rtol=1e-5, atol=1e-5, msg=name)
    # the dense baseline has the active width K * H
    assert impls["dense"][0].w_out.shape == (1, 2 * 32, 16)


def test_report_rows_agree_numerically(report):
    names = {r["impl"] for r in report["results"]}
    assert {"ours_sorted", "ours_grouped", "ours_loop", "dense"} <= names
    if bench_has_hf():
        assert {"hf_eager", "hf_grouped_mm", "hf_batched_mm"} <= names
    for r in report["results"]:
        # the rate is the tokens over the median of the timed runs (their values depend on the machine's load)
        assert len(r["times_s"]) == 1 and r["median_s"] == r["times_s"][0]
        assert r["tokens"] == 48 and r["tokens_per_s"] == pytest.approx(48 / r["median_s"], rel=1e-12)
        assert r["peak_mem_mib"] is None or r["peak_mem_mib"] >= 0
        if r["impl"] == "dense":
            assert r["max_abs_diff_out"] is None
        else:
            assert r["reference"] == "ours_sorted"
            assert r["max_abs_diff_out"] < 1e-5 and r["max_abs_diff_grad"] < 1e-5


def test_ratios_and_table(bench, report, tmp_path):
    (ratio,) = report["ratios"]
    by_impl = {r["impl"]: r["tokens_per_s"] for r in report["results"]}
    best = max(by_impl[k] for k in ("ours_sorted", "ours_grouped", "ours_loop"))
    assert by_impl[ratio["best_ours"]] == best
    assert ratio["vs_dense"] == pytest.approx(best / by_impl["dense"])
    if bench_has_hf():
        assert ratio["vs_hf_eager"] == pytest.approx(best / by_impl["hf_eager"])
        hf_best = max(v for k, v in by_impl.items() if k.startswith("hf_"))
        assert ratio["vs_hf_best"] == pytest.approx(best / hf_best)
    table = bench.format_table(report)
    assert table.count("\n| 48 | 4 | 2 |") == len(report["results"]) + 1  # one row per impl, one ratio row
    assert "vs HF eager" in table and "vs dense" in table
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(report))
    assert set(json.loads(out.read_text())) >= {"machine", "settings", "results", "ratios", "notes"}


def test_cli_quick_paths_and_bad_input(bench, tmp_path):
    with pytest.raises(ValueError, match="dtype='int8'"):
        bench.run_benchmark(tokens=[8], shapes=[(4, 2)], dim=16, hidden=16, dtype="int8")
    report = bench.main(
        ["--tokens", "32", "--dim", "16", "--hidden", "16", "--repeats", "1", "--max-assignments", "32",
         "--out", str(tmp_path / "b.json")]
    )  # fmt: skip
    # N*K = 64 > 32 for both shapes: every cell is skipped, with a note, and nothing is timed
    assert report["results"] == [] and len(report["notes"]) >= 2
    assert json.loads((tmp_path / "b.json").read_text())["ratios"] == []


def bench_has_hf() -> bool:
    return importlib.util.find_spec("transformers") is not None
