"""The sweep runner: routing x seeds jobs, resume (a job killed midway and continued ends as an uninterrupted one),
failures that do not stop the others, shipped presets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moe_lightning.commands import main as cli_main
from moe_lightning.commands.sweep import ARMS, Job, available_presets, job_command, job_config, load_preset, main
from moe_lightning.commands.sweep.progress import read_progress

ROOT = Path(__file__).resolve().parents[1]
# The tiny sweep's arms: both routings and the equal-FLOPs dense control (dense_total runs as its alias `dense` in
# test_failed_job_is_reported_and_others_go_on, and every arm's config fields are checked in
# test_job_config_sets_each_arms_model_fields).
TINY_ARMS = ["topk", "soft", "dense_active"]


TINY_CALLBACKS = [
    {
        "class_path": "moe_lightning.callbacks.GeometryMonitor",
        "init_args": {"every_n_steps": 3, "max_tokens": 32, "log_media": False},
    },
    {"class_path": "moe_lightning.callbacks.RouterMonitor"},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 2}},
]


def tiny_preset(tmp_path: Path, callbacks: tuple[dict, ...] = (), **extra) -> Path:
    """The MLP config cut to a few steps: 3 arms x 2 seeds, 5 batches an epoch, probes at steps 0, 3 and 6,
    ``last.ckpt`` every 2 steps; ``callbacks`` are added to the preset's."""
    preset = {
        "name": "tiny",
        "family": "mlp",
        "configs": ["configs/mlp/topk.yaml", "configs/trainer/cpu.yaml"],
        "routings": TINY_ARMS,
        "seeds": [0, 1],
        "overrides": {
            "trainer": {"max_steps": 6, "limit_val_batches": 1, "callbacks": [*TINY_CALLBACKS, *callbacks]},
            "data": {"init_args": {"num_train": 160, "num_val": 64, "batch_size": 32}},
            # No end-of-fit report per job (several seconds each): tests/test_run_summary.py covers it.
            "summary": False,
        },
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    preset = tiny_preset(tmp)
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:  # two CPU jobs side by side, each with cpu_count // 2 threads
        code = main([str(preset), "--out", str(tmp / "out"), "--loggers", "csv", "--no-report", "--devices", "2"])
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    return code, tmp / "out" / "tiny", preset


def test_sweep_runs_every_routing_and_seed(tiny_sweep) -> None:
    code, root, _ = tiny_sweep
    assert code == 0
    assert json.loads((root / "sweep.json").read_text())["routings"] == TINY_ARMS
    finals = {}
    for routing in TINY_ARMS:
        for seed in (0, 1):
            job = root / f"{routing}-seed{seed}"
            status = json.loads((job / "run.json").read_text())
            assert (status["status"], status["returncode"], status["routing"], status["seed"]) == (
                "done",
                0,
                routing,
                seed,
            )
            config = yaml.safe_load((job / "config.yaml").read_text())
            model = config["model"]["init_args"]["config"]
            assert {k: model[k] for k in ARMS[routing]} == ARMS[routing]
            assert config["seed_everything"] == seed
            metrics = pd.read_csv(job / "metrics.csv")
            probed = metrics.dropna(subset=["geometry/blocks.0.ffn/jac_sigma_max/mean"])
            assert sorted(probed["step"].astype(int)) == [0, 3, 6]
            # The saved full reports hold the same numbers as the logged scalars.
            report = json.loads((job / "geometry" / "step_0000006.json").read_text())["layers"]["blocks.0.ffn"]
            sigma = torch.tensor(report["expert"]["jac_sigma_max"], dtype=torch.float64)
            logged = probed.loc[probed["step"] == 6, "geometry/blocks.0.ffn/jac_sigma_max/mean"].item()
            assert logged == pytest.approx(sigma[torch.isfinite(sigma)].mean().item(), rel=1e-12)
            assert report["num_experts"] == (1 if routing.startswith("dense") else 8)
            assert read_progress(job) == (6, 6)  # the progress callback's last write: the step of the end
            if routing == "dense_active":  # equal FLOPs: hidden k·H = 2·64 (the MoE's total would be 8·64)
                assert len(report["pca"]["hidden"][0]["eigenvalues"]) == 128
            finals[(routing, seed)] = logged
    # --devices 2 on CPU: two jobs at a time, each told to use half the cores.
    statuses = [json.loads(p.read_text()) for p in sorted(root.glob("*/run.json"))]
    assert {s["omp_num_threads"] for s in statuses} == {str(max(1, (os.cpu_count() or 1) // 2))}
    first, second = sorted(statuses, key=lambda s: s["started_unix"])[:2]
    assert second["started_unix"] < first["started_unix"] + first["wall_s"]  # started before the first ended
    # Seeds change the initialisation, so the same routing gives different numbers per seed.
    for routing in TINY_ARMS:
        assert finals[(routing, 0)] != finals[(routing, 1)]


def test_sweep_resumes_and_reruns_only_unfinished_jobs(tiny_sweep, capsys) -> None:
    code, root, preset = tiny_sweep
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/metrics.csv")}
    # Simulate an interruption of one job before its first checkpoint: it starts again from scratch.
    status_file = root / "soft-seed1" / "run.json"
    status = json.loads(status_file.read_text())
    status_file.write_text(json.dumps({**status, "status": "running"}))
    shutil.rmtree(root / "soft-seed1" / "checkpoints")
    capsys.readouterr()
    assert main([str(preset), "--out", str(root.parent), "--loggers", "csv", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == 5
    assert "[4/6] soft-seed1: started in" in out and "[4/6] soft-seed1: done in" in out
    after = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/metrics.csv")}
    changed = sorted(name for name in stamps if after[name] != stamps[name])
    assert changed == ["soft-seed1"]
    assert json.loads(status_file.read_text())["status"] == "done"


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_job_killed_midway_and_resumed_ends_as_the_uninterrupted_one(tiny_sweep, tmp_path, monkeypatch, capsys):
    """topk-seed0 of the tiny sweep again, SIGKILLed at the start of step 3 (after the checkpoint of step 2, in the
    first of its two epochs), then continued with --resume: the same final weights, history and geometry reports
    as the uninterrupted job of the tiny sweep."""
    _, reference_root, _ = tiny_sweep
    reference = reference_root / "topk-seed0"
    kill = {"class_path": "interrupt.KillAtStep", "init_args": {"step": 3}}  # tests/interrupt.py
    preset = tiny_preset(tmp_path, callbacks=(kill,), routings=["topk"], seeds=[0])
    tests = str(ROOT / "tests")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    # the thread count of the reference job: float sums in another order would differ in the last bits
    monkeypatch.setenv("OMP_NUM_THREADS", json.loads((reference / "run.json").read_text())["omp_num_threads"])
    argv = [str(preset), "--out", str(tmp_path / "out"), "--loggers", "csv", "--no-report"]
    assert main(argv) == 1
    job = tmp_path / "out" / "tiny" / "topk-seed0"
    killed = json.loads((job / "run.json").read_text())
    assert (killed["status"], killed["returncode"]) == ("failed", -9)
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] topk-seed0: continued from its last checkpoint in" in out
    status = json.loads((job / "run.json").read_text())
    assert status["status"] == "done" and len(status["continued"]) == 1
    assert status["command"][-4:] == ["--config", str(job / "config.yaml"), "--ckpt_path", "last"]
    final = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 6
    assert _tensors_equal(final["state_dict"], expected["state_dict"])
    # One history: every row of the uninterrupted job's metrics.csv, in its order, none twice.
    pd.testing.assert_frame_equal(
        pd.read_csv(job / "metrics.csv").sort_index(axis=1), pd.read_csv(reference / "metrics.csv").sort_index(axis=1)
    )
    reports = sorted(path.name for path in (reference / "geometry").iterdir())
    assert reports == sorted(path.name for path in (job / "geometry").iterdir())
    assert len(reports) == 3 and all(
        (job / "geometry" / name).read_bytes() == (reference / "geometry" / name).read_bytes() for name in reports
    )


def _stopped_job(tmp_path: Path, checkpoint: bytes) -> tuple[Path, list[str]]:
    """A tiny sweep of one job whose folder says it was killed while running, holding ``checkpoint`` as its
    ``last.ckpt``: ``(its folder, the sweep's argv)``."""
    preset = tiny_preset(tmp_path, routings=["topk"], seeds=[0])
    job = tmp_path / "out" / "tiny" / "topk-seed0"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(checkpoint)
    (job / "config.yaml").write_text("seed_everything: 0\n")
    (job / "run.json").write_text(json.dumps({"status": "running", "pid": None}))
    return job, [str(preset), "--out", str(tmp_path / "out"), "--loggers", "csv", "--no-report"]


def test_a_stopped_job_with_a_checkpoint_is_not_thrown_away_without_resume(tmp_path, capsys):
    job, argv = _stopped_job(tmp_path, b"a checkpoint")
    before = sorted(str(path) for path in job.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = job / "checkpoints" / "last.ckpt"
    assert f"1 job(s) stopped before their end with a checkpoint: {last}; continue them with --resume" in err
    assert sorted(str(path) for path in job.rglob("*")) == before


def test_a_job_whose_checkpoint_is_unreadable_fails_and_names_it(tmp_path, capsys):
    job, argv = _stopped_job(tmp_path, b"PK\x03\x04 cut short")
    assert main([*argv, "--resume"]) == 1
    last = job / "checkpoints" / "last.ckpt"
    status = json.loads((job / "run.json").read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith(f"checkpoint {str(last)!r} is unreadable: not a torch.save archive")
    out = capsys.readouterr().out
    assert f"[1/1] topk-seed0: failed, not continued: checkpoint {str(last)!r} is unreadable" in out
    assert last.read_bytes() == b"PK\x03\x04 cut short"  # kept: deleting the folder starts the job again


@pytest.mark.integration  # a sweep of fit subprocesses
def test_failed_job_is_reported_and_others_go_on(tmp_path, capsys) -> None:
    # top_k=99 is invalid: the soft job fails at config validation, dense still trains.
    preset = tiny_preset(
        tmp_path,
        routings=["dense", "soft"],
        seeds=[0],
        routing_overrides={"soft": {"model": {"init_args": {"config": {"top_k": 99}}}}},
    )
    # both jobs side by side: the failing one must not stop the other while it runs
    code = main([str(preset), "--out", str(tmp_path / "out"), "--loggers", "csv", "--no-report", "--devices", "2"])
    out = capsys.readouterr().out
    assert code == 1
    root = tmp_path / "out" / "tiny"
    assert json.loads((root / "dense-seed0" / "run.json").read_text())["status"] == "done"
    failed = json.loads((root / "soft-seed0" / "run.json").read_text())
    assert failed["status"] == "failed" and failed["returncode"] != 0
    assert "top_k must satisfy" in (root / "soft-seed0" / "fit.log").read_text()
    assert "soft-seed0: failed" in out and "1/2 jobs done; failed: soft-seed0" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no_such_preset"], "shipped presets: mlp_paper, mlp_small"),
        (
            ["mlp_small", "--routings", "moe"],
            "routings ['moe'] not allowed; choose from ('topk', 'soft', 'dense_total', 'dense_active', 'dense')",
        ),
        (["mlp_small", "--seeds", "0", "--num-seeds", "2"], "give --seeds or --num-seeds, not both"),
        (["mlp_small", "--loggers", "tensorboard"], "loggers ['tensorboard'] not allowed"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, tmp_path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_job_config_layers_routing_seed_and_loggers(tmp_path) -> None:
    preset = load_preset(str(tiny_preset(tmp_path, routing_overrides={"soft": {"model": {"init_args": {"lr": 0.5}}}})))
    config = job_config(preset, Job("soft", 7, tmp_path / "job"), ["csv", "wandb"], "proj")
    assert config["seed_everything"] == 7
    assert config["model"]["init_args"] == {"lr": 0.5, "config": {"routing": "soft"}}
    assert config["trainer"]["max_steps"] == 6  # from the preset's overrides
    assert [logger["class_path"].rsplit(".", 1)[1] for logger in config["trainer"]["logger"]] == [
        "CSVLogger",
        "AutoWandbLogger",
    ]
    assert config["trainer"]["logger"][1]["init_args"]["name"] == "tiny/soft-seed7"


@pytest.mark.parametrize(
    ("arm", "fields"),
    [
        ("dense_total", {"routing": "dense", "capacity_match": "total"}),
        ("dense_active", {"routing": "dense", "capacity_match": "active"}),
        ("dense", {"routing": "dense", "capacity_match": "total"}),  # the older name of dense_total
        ("topk", {"routing": "topk"}),
    ],
)
def test_job_config_sets_each_arms_model_fields(arm, fields, tmp_path) -> None:
    preset = load_preset(str(tiny_preset(tmp_path, routings=["topk", arm] if arm != "topk" else ["topk"])))
    assert job_config(preset, Job(arm, 0, tmp_path / "job"), ["csv"], "proj")["model"]["init_args"]["config"] == fields


@pytest.mark.parametrize("name", available_presets())
def test_shipped_presets_parse(name, tmp_path, capsys, monkeypatch) -> None:
    """Every job of every shipped preset is a valid ``fit`` config (LightningCLI --print_config validates it)."""
    preset = load_preset(name)
    assert preset.routings[:4] == list(ARMS) and len(preset.seeds) >= 3
    job = Job("soft", preset.seeds[0], tmp_path / "job")
    job.dir.mkdir()
    (job.dir / "job.yaml").write_text(yaml.safe_dump(job_config(preset, job, ["csv"], "proj")))
    monkeypatch.chdir(ROOT)  # the configs name data files relative to the project root
    argv = job_command(preset, job)[job_command(preset, job).index("fit") :]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["config"]["routing"] == "soft"
    assert printed["seed_everything"] == preset.seeds[0]
    assert printed["trainer"]["logger"][0]["class_path"] == "lightning.pytorch.loggers.CSVLogger"


def test_transformer_small_variants_compare_aux_loss_and_aux_free(tmp_path, capsys, monkeypatch) -> None:
    """The DeepSeek-V3 routing family as two variants of the shipped preset: valid fit configs that differ only in
    load_balancing, with the variant's routing (not a routing the sweep sets)."""
    preset = load_preset("transformer_small")
    monkeypatch.chdir(ROOT)
    printed = {}
    for name in ("deepseek_aux_loss", "deepseek_aux_free"):
        job = Job(name, 0, tmp_path / name)
        job.dir.mkdir()
        (job.dir / "job.yaml").write_text(yaml.safe_dump(job_config(preset, job, ["csv"], "proj")))
        argv = job_command(preset, job)[job_command(preset, job).index("fit") :]
        assert str(ROOT / "configs/transformer/wikitext_deepseek.yaml") in argv
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*argv, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed[name] = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["config"]
    assert printed["deepseek_aux_loss"].pop("load_balancing") == "aux_loss"
    assert printed["deepseek_aux_free"].pop("load_balancing") == "aux_free"
    assert printed["deepseek_aux_loss"] == printed["deepseek_aux_free"]
    assert printed["deepseek_aux_free"]["scoring"] == "sigmoid" and printed["deepseek_aux_free"]["routing"] == "topk"
    assert printed["deepseek_aux_free"]["num_shared_experts"] == 1


@pytest.mark.integration  # a sweep of fit subprocesses
def test_a_variant_runs_and_the_report_groups_it_under_its_name(tmp_path) -> None:
    from moe_lightning.analysis.discover import discover_runs

    variant = {"overrides": {"model": {"init_args": {"config": {"scoring": "sigmoid", "load_balancing": "aux_free"}}}}}
    preset = tiny_preset(
        tmp_path, routings=["topk", "sigmoid_aux_free"], seeds=[0], variants={"sigmoid_aux_free": variant}
    )
    code = main([str(preset), "--out", str(tmp_path / "out"), "--loggers", "csv", "--no-report", "--devices", "2"])
    assert code == 0
    job = tmp_path / "out" / "tiny" / "sigmoid_aux_free-seed0"
    assert json.loads((job / "run.json").read_text())["variant"] is True
    config = yaml.safe_load((job / "config.yaml").read_text())["model"]["init_args"]["config"]
    assert (config["routing"], config["scoring"], config["load_balancing"]) == ("topk", "sigmoid", "aux_free")
    runs = {run.routing: run for run in discover_runs([str(tmp_path / "out" / "tiny")])}
    assert set(runs) == {"topk", "sigmoid_aux_free"} and all(run.ok for run in runs.values())
    assert "router/blocks.0.ffn/bias_range" in runs["sigmoid_aux_free"].history.columns


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"topk": {}}, "variant name 'topk' must be a new name"),
        ({"x": {"config": {}}}, "variant 'x' must be a mapping with keys 'configs' and/or 'overrides'"),
        ({"x": {"configs": "a.yaml"}}, "variant 'x': configs must be a list"),
    ],
)
def test_bad_variants_give_clear_errors(variants, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        load_preset(str(tiny_preset(tmp_path, variants=variants)))
