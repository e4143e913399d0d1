"""The GPU run (scripts/gpu_check.sh): its CPU rehearsal end to end, each step's status and artefacts, and the
figures of its summary against the files they come from; and the driver's own bookkeeping on small stand-in steps
(a failure, a timeout, a missing artefact), none of which stops the run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPTS))  # gpu_check imports gpu_check_steps as a script beside it
    try:
        yield load_script(SCRIPTS / "gpu_check.py")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """``scripts/gpu_check.sh --cpu OUT``, once: its exit code, output folder and summary."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--cpu", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return run, out, summary


def shipped_configs() -> list[str]:
    """The model configs under configs/ (the trainer and sweep presets are no fit configs of their own)."""
    configs = (ROOT / "configs").glob("*/*.yaml")
    return sorted(str(p.relative_to(ROOT)) for p in configs if p.parent.name not in ("trainer", "sweep"))


# The whole rehearsal: every shipped config through `moe-lightning fit`, the benchmarks and the observation check in
# processes of their own (about 40 s on 2 cores): an integration test (docs/testing.md).
@pytest.mark.integration
def test_the_rehearsal_runs_every_step(rehearsal):
    run, out, summary = rehearsal
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    status = {row["step"]: row["status"] for row in summary["steps"]}
    expected = ["gpu-tests"] + [f"fit {config}" for config in shipped_configs()]
    expected += ["observation", "benchmark-moe", "benchmark-callbacks", "benchmark-probe", "sweep"]
    assert list(status) == expected
    assert status.pop("gpu-tests") == ("ok" if torch.cuda.is_available() else "skipped: no CUDA")
    probe = sorted(SCRIPTS.glob("benchmark_*probe*.py"))
    assert status.pop("benchmark-probe") == ("ok" if probe else "absent")
    assert set(status.values()) == {"ok"}, status
    assert summary["device"] == "cpu (--cpu)" and summary["torch"] == torch.__version__
    assert summary["command"].startswith("scripts/gpu_check.sh --cpu")
    # the printed table is the one saved, and the archive holds the folder
    table = (out / "summary.md").read_text()
    assert "| step | status | seconds | key figure |" in table and table.strip() in run.stdout
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        assert f"{out.name}/summary.md" in tar.getnames() and f"{out.name}/fits/fits.json" in tar.getnames()


@pytest.mark.integration  # reads the rehearsal's output (see above)
def test_each_fit_logged_every_monitor_and_the_summary_says_what_its_csv_holds(rehearsal):
    _, out, summary = rehearsal
    rows = {row["step"]: row for row in summary["steps"]}
    fits = json.loads((out / "fits" / "fits.json").read_text())
    assert [f"fit {fit['config']}" for fit in fits] == [f"fit {config}" for config in shipped_configs()]
    for fit in fits:
        with open(out / "fits" / fit["name"] / "metrics.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            columns, records = reader.fieldnames, list(reader)
        dense = "dense" in fit["name"]  # no router to monitor
        for prefix in ("geometry/", "curvature/") + (() if dense else ("router/",)):
            assert any(c.startswith(prefix) for c in columns), (fit["name"], prefix)
        losses = [float(r["train/loss"]) for r in records if r["train/loss"]]
        assert len(losses) == 2  # --steps 2, logged every step
        counts = {p: sum(c.startswith(p + "/") for c in columns) for p in ("geometry", "router", "curvature")}
        figure = f"loss {losses[-1]:.3f} after 2 steps; keys " + " / ".join(f"{k} {n}" for k, n in counts.items())
        assert rows[f"fit {fit['config']}"]["figure"] == figure


@pytest.mark.integration  # reads the rehearsal's output (see above)
def test_benchmarks_and_the_observation_check_left_their_results(rehearsal):
    _, out, summary = rehearsal
    rows = {row["step"]: row for row in summary["steps"]}
    moe = json.loads((out / "benchmark_moe.json").read_text())
    impls = {r["impl"] for r in moe["results"] if r["tokens_per_s"]}
    assert {"ours_sorted", "ours_grouped", "ours_loop", "dense"} <= impls
    if "hf_grouped_mm" in impls:  # with transformers installed: the ratio the summary gives, from the JSON
        cell = {r["impl"]: r["tokens_per_s"] for r in moe["results"] if (r["tokens"], r["num_experts"]) == (64, 8)}
        best = max((name for name in cell if name.startswith("ours_")), key=cell.get)
        expected = f"{best} {cell[best] / cell['hf_grouped_mm']:.2f}x HF grouped_mm, {cell[best] / cell['dense']:.2f}x"
        assert expected in rows["benchmark-moe"]["figure"]
    callbacks = json.loads((out / "benchmark_callbacks.json").read_text())
    assert callbacks["settings"]["device"] == "cpu" and set(callbacks["runs"]) == {"none", "router", "geometry"}
    assert f"step {callbacks['baseline_step_ms']:.1f} ms" in rows["benchmark-callbacks"]["figure"]
    cases = json.loads((out / "observation.json").read_text())
    assert [c["case"] for c in cases] == ["mlp bf16-mixed", "transformer bf16-mixed"]
    for case in cases:
        assert case["status"] == "ok" and case["differ_with_monitors"] == [] and case["geometry_probed_steps"]
    assert rows["sweep"]["figure"] == "dry run: 4 jobs planned"  # transformer_small: 4 arms, seed 0


# -------------------------------------------------------------------------- the driver, on stand-in steps


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_step_is_recorded_with_the_end_of_its_log(gpu_check, tmp_path):
    step = gpu_check.Step("boom", python("print('about to fail'); raise SystemExit(3)"))
    row = gpu_check.run_step(step, tmp_path, dict(os.environ), limit_s=60)
    assert row["status"] == "failed (exit 3)" and row["log_tail"][-1] == "about to fail"
    assert (tmp_path / "boom.log").read_text().splitlines()[-1] == "about to fail"


def test_a_step_past_its_limit_is_stopped_and_recorded(gpu_check, tmp_path):
    step = gpu_check.Step("slow", python("import time; print('started', flush=True); time.sleep(60)"))
    row = gpu_check.run_step(step, tmp_path, dict(os.environ), limit_s=2)
    assert row["status"] == "timeout (2 s)" and "started" in row["log_tail"]


def test_a_step_without_its_artefact_fails_and_its_figure_is_read_from_it(gpu_check, tmp_path):
    quiet = gpu_check.Step("quiet", python("pass"), artefacts=("result.json",))
    assert gpu_check.run_step(quiet, tmp_path, dict(os.environ), 60)["status"] == "failed (missing result.json)"
    write = "import json, sys; json.dump({'n': 7}, open(sys.argv[1], 'w'))"
    figure = lambda out: f"n={json.loads((out / 'result.json').read_text())['n']}"  # noqa: E731
    step = gpu_check.Step("writes", [*python(write), str(tmp_path / "result.json")], 60, ("result.json",), figure)
    row = gpu_check.run_step(step, tmp_path, dict(os.environ), 60)
    assert (row["status"], row["figure"]) == ("ok", "n=7") and "log_tail" not in row


def test_a_failure_does_not_stop_the_run(gpu_check, tmp_path, monkeypatch):
    steps = [
        gpu_check.Step("first", python("raise SystemExit('first failed')")),
        gpu_check.Step("second", python("print('second ran')"), figure=lambda out: "fine"),
        gpu_check.Step("optional", python("pass"), min_left_s=1e9),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *args: steps)
    monkeypatch.setattr(gpu_check, "archive", lambda out: None)
    args = gpu_check.parse_args([str(tmp_path), "--cpu"])
    assert gpu_check.run_all(args, tmp_path, "gpu_check.sh --cpu", dict(os.environ), cuda=False) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["step"]: row for row in summary["steps"]}
    assert rows["first"]["status"] == "failed (exit 1)" and rows["first"]["log_tail"][-1] == "first failed"
    assert (rows["second"]["status"], rows["second"]["figure"]) == ("ok", "fine")
    assert rows["optional"]["status"].startswith("skipped (optional)")
    assert "first: last lines of first.log" in (tmp_path / "summary.md").read_text()


def test_the_figures_of_the_steps_that_need_a_gpu(gpu_check, tmp_path):
    steps = sys.modules["gpu_check_steps"]
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="9" failures="1" errors="1" skipped="2"></testsuite></testsuites>'
    )
    assert steps.tests_figure(tmp_path) == "5 passed, 2 failed, 2 skipped"
    (tmp_path / "sweep.log").write_text("[sweep] topk-seed0 done\n[sweep] 3/4 jobs done; failed: soft-seed0\n")
    assert steps.sweep_figure(tmp_path) == "3/4 jobs done"
    # fits stopped at their limit after one config: its row, then one for the rest
    (tmp_path / "fits").mkdir()
    fit = {"config": "configs/mlp/topk.yaml", "name": "mlp-topk", "status": "ok", "seconds": 3.0}
    fit.update(last_loss=0.5, steps_logged=7, keys={"geometry": 3, "router": 2, "curvature": 1})
    (tmp_path / "fits" / "fits.json").write_text(json.dumps([fit]))
    rows = steps.fit_rows({"step": "fits", "status": "timeout (200 s)", "seconds": 200.0}, tmp_path)
    assert [(r["step"], r["status"]) for r in rows] == [
        ("fit configs/mlp/topk.yaml", "ok"),
        ("fits (the rest)", "timeout (200 s)"),
    ]
    assert rows[0]["figure"] == "loss 0.500 after 6 steps; keys geometry 3 / router 2 / curvature 1"


def test_on_cuda_every_step_runs_on_the_gpu_and_the_rehearsal_on_the_cpu(gpu_check, tmp_path):
    steps = sys.modules["gpu_check_steps"]
    assert steps.ON_CUDA.keys() == steps.ON_CPU.keys()
    on_gpu = {step.name: step.command for step in steps.plan(ROOT, tmp_path, False, "python", True)}
    assert on_gpu["fits"][-4:] == ["--trainer", "gpu", "--steps", "6"]  # configs/trainer/gpu.yaml: bf16-mixed
    for name in ("observation", "benchmark-moe", "benchmark-callbacks"):
        assert on_gpu[name][on_gpu[name].index("--device") + 1] == "cuda", name
    assert "--trainer.accelerator=gpu" in on_gpu["sweep"]
    on_cpu = {step.name: step for step in steps.plan(ROOT, tmp_path, True, "python", False)}
    assert on_cpu["gpu-tests"].skip == "skipped: no CUDA" and "--dry-run" in on_cpu["sweep"].command
    words = [word for step in on_cpu.values() for word in step.command]
    assert "cuda" not in words and "--trainer.accelerator=gpu" not in words
    assert on_cpu["fits"].command[-5:] == ["--trainer", "cpu", "--steps", "2", "--tiny"]


def test_the_observation_check_tells_a_meddling_callback_from_an_unreproducible_device(monkeypatch):
    observation = load_script(SCRIPTS / "gpu_check_observation.py")
    assert observation.check("mlp", True, "cpu", "32-true")["status"] == "ok"

    class Meddler(L.Callback):
        """Writes a weight while it observes, as a probe must never do."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:  # after the last step: only this weight differs
                with torch.no_grad():
                    pl_module.model.head.weight.add_(1e-3)

    monitors = observation.monitors
    monkeypatch.setattr(observation, "monitors", lambda: [*monitors(), Meddler()])
    result = observation.check("mlp", True, "cpu", "32-true")
    assert result["status"] == "failed" and result["differ_with_monitors"] == ["model.head.weight"]
    # a device whose two plain runs differ (here: a new seed per run) says so, and blames nothing
    seeds = iter(range(100))
    case = observation.CASES["mlp"]
    monkeypatch.setitem(observation.CASES, "mlp", lambda tiny: (torch.manual_seed(next(seeds)), case(tiny))[1])
    assert observation.check("mlp", True, "cpu", "32-true")["status"] == "not reproducible"
