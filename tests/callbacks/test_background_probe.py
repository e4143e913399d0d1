"""GeometryMonitor(background=True): each probe computed beside training in a forked child gives the values the probe
in the step gives, logged at the step they describe, and training ends in the weights it ends in without the
monitor. A lost child, or a run where a fork cannot probe, is one warning and the probe runs in the step."""

import os
import warnings

import lightning as L
import pytest
import torch
from helpers import read_metrics
from lightning.pytorch.loggers import CSVLogger
from test_observation import PlainMoE, assert_same_weights, datamodule, weights

import moe_lightning.monitors.geometry_beside as geometry_beside
import moe_lightning.monitors.geometry_probe as geometry_probe
import moe_lightning.monitors.sharded as sharded
from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.monitors import GeometryProbe, LoopMonitors
from moe_lightning.monitors.background import fork_unavailable

# Every test here trains twice or more (about 2 s each): integration tests (docs/testing.md).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(fork_unavailable() is not None, reason="a probe beside training forks: Linux"),
]
STEPS = 7


def train(tmp_path, name: str, monitor: GeometryMonitor | None):
    module = PlainMoE()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=STEPS,
            callbacks=[] if monitor is None else [monitor],
            logger=CSVLogger(tmp_path, name=name),
            log_every_n_steps=1,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule())
    ours = [str(w.message) for w in caught if "GeometryMonitor" in str(w.message)]
    return module, trainer, ours


def geometry_rows(tmp_path, name: str) -> dict[int, dict[str, float]]:
    """``{step: {geometry key: value}}`` from the run's metrics.csv."""
    rows: dict[int, dict[str, float]] = {}
    for row in read_metrics(tmp_path / name):
        values = {k: float(v) for k, v in row.items() if k.startswith("geometry/") and v not in ("", None)}
        if values:
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def monitor(**options) -> GeometryMonitor:
    return GeometryMonitor(every_n_steps=2, max_tokens=32, log_media=False, save_reports=False, **options)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The parent's torch threads (the child's SVDs are split over as many: spectra.SVD_WORKERS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_values_beside_training_equal_those_in_the_step_at_the_same_steps(tmp_path, threads):
    plain, _, _ = train(tmp_path, "plain", None)
    in_step, _, warned = train(tmp_path, "in_step", monitor())
    beside_monitor = monitor(background=True)
    beside, trainer, warned_beside = train(tmp_path, "beside", beside_monitor)
    assert warned == [] and warned_beside == []
    assert_same_weights(weights(plain), weights(beside))
    assert_same_weights(weights(in_step), weights(beside))
    expected, found = geometry_rows(tmp_path, "in_step"), geometry_rows(tmp_path, "beside")
    # probes at 0, 2, 4, 6 (beside training) and the final one at 7 (in the step)
    assert sorted(expected) == sorted(found) == [0, 2, 4, 6, 7]
    for step, values in expected.items():
        assert found[step].keys() == values.keys(), step
        assert len(values) > 50
        for key, value in values.items():  # the same arithmetic, to round-off (the child's GEMMs on one thread)
            assert found[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (step, key)
    assert beside_monitor.probed_steps == [0, 2, 4, 6, 7] and beside_monitor.logged_steps == {"ffn": 7}
    assert beside_monitor.core.beside.in_flight is None  # nothing left running
    key = "geometry/ffn/jac_sigma_max/mean"
    assert float(trainer.callback_metrics[key]) == pytest.approx(expected[7][key], rel=1e-6)  # float32 tensors


def test_a_single_process_child_finishes_its_reports_and_the_step_only_logs_them(tmp_path, monkeypatch):
    """One process has nothing to sum over ranks: the child finalises its layers' reports, so the step that delivers
    a probe made beside training does not (the values are those of the step: the test above)."""
    finalized = []
    through = geometry_probe.finalize
    monkeypatch.setattr(geometry_probe, "finalize", lambda stats: finalized.append(os.getpid()) or through(stats))
    train(tmp_path, "beside", monitor(background=True))
    assert sorted(geometry_rows(tmp_path, "beside")) == [0, 2, 4, 6, 7]
    assert finalized == [os.getpid()]  # the final probe (in the step) only: not the four made beside training


def test_a_lost_child_is_one_warning_and_later_probes_run_in_the_step(tmp_path, monkeypatch):
    parent = os.getpid()

    def dies(*args, **kwargs):
        if os.getpid() != parent:  # in the child: a crash (out of memory, a segfault) sends nothing back
            os._exit(5)
        raise RuntimeError("injected in-step failure")

    monkeypatch.setattr(sharded, "probe_statistics", dies)
    lost = monitor(background=True)
    _, _, warned = train(tmp_path, "lost", lost)
    (message,) = [m for m in warned if "beside training" in m]
    assert "ChildLost" in message and "exit code 5" in message
    assert "no values are logged at step 0, and later probes run in the step" in message
    assert not lost.core.beside.enabled
    # the probes after it ran in the step (in this process, where the patch raises), and said so once
    (failed,) = [m for m in warned if "the probe failed" in m]
    assert "injected in-step failure" in failed and "at step 2" in failed


def test_where_a_fork_cannot_probe_the_probe_runs_in_the_step_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(geometry_beside, "fork_unavailable", lambda: "it forks the process (here: a test)")
    fallback = monitor(background=True)
    _, _, warned = train(tmp_path, "fallback", fallback)
    assert warned == [
        "GeometryMonitor: background=True: it forks the process (here: a test); probing in the step instead"
    ]
    assert sorted(geometry_rows(tmp_path, "fallback")) == [0, 2, 4, 6, 7]


def test_loops_that_log_at_their_current_step_refuse_background():
    probe = GeometryProbe(background=True)
    with pytest.raises(ValueError, match="LoopMonitors: GeometryProbe\\(background=True\\) is not supported"):
        LoopMonitors(torch.nn.Linear(2, 2), torch.zeros(1, 2), None, probe)
