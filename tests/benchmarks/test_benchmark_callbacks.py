"""scripts/benchmark_callbacks.py at a tiny size: the config's own GeometryMonitor beside training and in the step,
side by side, give the same values at steps 0 and 200 of the WikiText transformer, and each probe computed beside
training reports its child's clocks. No time is checked against a bound: they depend on the machine."""

import math
from pathlib import Path

import pytest
from helpers import load_script

from moe_lightning.monitors.background import fork_unavailable

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_callbacks.py"

# Trains the WikiText transformer 4 x 201 steps at a tiny block and batch size (about 30 s): an integration test.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(fork_unavailable() is not None, reason="the shipped config probes beside training: Linux"),
]


def test_the_shipped_monitor_gives_the_same_values_beside_training_and_in_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_script(SCRIPT)
    args = ["--variants", "shipped", "shipped_in_step", "--steps", "201", "--repeats", "1"]
    report = bench.main([*args, "--block-size", "8", "--batch-size", "2", "--probe-tokens", "16", "--threads", "1"])
    beside, in_step = report["runs"]["shipped"][0], report["runs"]["shipped_in_step"][0]
    assert sorted(beside["values"]) == sorted(in_step["values"]) == [0, 200]  # the config probes every 200 steps
    assert len(in_step["values"][200]) > 100
    assert report["shipped"]["max_relative_difference"] == 0  # one thread in both: the same arithmetic
    for step, values in in_step["values"].items():
        for key, value in values.items():
            found = beside["values"][step][key]
            assert found == value or (math.isnan(found) and math.isnan(value)), (step, key)
    children = report["shipped"]["children"]
    assert [step for step, _, _ in children] == [0, 200] and in_step["children"] == []
    assert all(cpu >= 0 and wall >= 0 for _, cpu, wall in children)
    assert report["shipped"]["probes"] == report["shipped_in_step"]["probes"] == 2
