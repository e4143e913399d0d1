"""What ``moe-lightning fit`` shows for a misspelled config key and for a bad ``--ckpt_path``: one first line that
names the file, the field and the fault (with the nearest allowed name), exit code 2, and no file written."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from moe_lightning.commands import main
from moe_lightning.commands.checkpoint import check_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOPK = (ROOT / "configs" / "mlp" / "topk.yaml").read_text()
# A Lightning checkpoint of 0.1.0, kept for the compatibility tests: a real file written by Trainer.save_checkpoint.
LIGHTNING_CKPT = ROOT / "tests" / "assets" / "v0_1_0" / "mlp_topk.ckpt"


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``(exit code, stderr lines)`` of ``moe-lightning *argv`` run in this process."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err.splitlines()


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize(
    ("right", "wrong", "first_line"),
    [
        (
            "seed_everything: 0",
            "seed_everyting: 0",
            "bad.yaml: unknown key 'seed_everyting'; did you mean 'seed_everything'?",
        ),
        ("max_epochs: 16", "max_epoch: 16", "bad.yaml: trainer: unknown key 'max_epoch'; did you mean 'max_epochs'?"),
        (
            "num_experts: 8",
            "num_expert: 8",
            "bad.yaml: model.init_args.config: unknown key 'num_expert'; did you mean 'num_experts'?",
        ),
        ("lr: 0.002", "lrr: 0.002", "bad.yaml: model.init_args: unknown key 'lrr'; did you mean 'lr'?"),
        (
            "every_n_steps: 256",
            "every_n_step: 256",
            "bad.yaml: trainer.callbacks[0].init_args: unknown key 'every_n_step'; did you mean 'every_n_steps'?",
        ),
        ("top_k: 2", "top_k: two", "bad.yaml: model.init_args.config.top_k: Expected a <class 'int'>. Got value: two"),
    ],
    ids=["top-level", "trainer", "model-config", "model", "callback", "wrong-type"],
)
def test_a_misspelled_key_is_named_in_the_first_line(right, wrong, first_line, tmp_path, monkeypatch, capsys):
    assert right in TOPK
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(TOPK.replace(right, wrong, 1))
    code, err = run(["fit", "--config", "bad.yaml"], capsys)
    assert code == 2
    assert err == [f"moe-lightning: error: {first_line}", "see: moe-lightning fit --help"]
    assert files_under(tmp_path) == ["bad.yaml"]


@pytest.mark.parametrize(
    ("option", "first_line"),
    [
        ("--trainer.acelerator=cpu", "unknown option '--trainer.acelerator'; did you mean '--trainer.accelerator'?"),
        ("--sumary=false", "unknown option '--sumary'; did you mean '--summary'?"),
        (
            "--model.init_args.config.num_expert=4",
            "model.init_args.config: unknown key 'num_expert'; did you mean 'num_experts'?",
        ),
    ],
)
def test_a_misspelled_option_is_named_in_the_first_line(option, first_line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", "--config", str(ROOT / "configs/mlp/topk.yaml"), option], capsys)
    assert code == 2 and err[0] == f"moe-lightning: error: {first_line}"
    assert files_under(tmp_path) == []


def _checkpoints(directory: Path) -> dict[str, tuple[Path, str]]:
    """Bad checkpoints as users meet them, each with the fault its first line must name."""
    data = LIGHTNING_CKPT.read_bytes()
    (directory / "truncated.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    (directory / "garbage.ckpt").write_bytes(b"\x00\xff not a checkpoint" * 64)
    (directory / "empty.ckpt").write_bytes(b"")
    torch.save({"weight": torch.zeros(2)}, directory / "state_dict.pt")
    (directory / "folder.ckpt").mkdir()
    return {
        "missing": (
            directory / "missing.ckpt",
            "does not exist; give a .ckpt file or one of last, best, hpc, registry",
        ),
        "truncated": (directory / "truncated.ckpt", "is unreadable: not a torch.save archive"),
        "garbage": (directory / "garbage.ckpt", "is unreadable: not a torch.save archive"),
        "empty": (directory / "empty.ckpt", "is empty (0 bytes)"),
        "state_dict": (
            directory / "state_dict.pt",
            "is not a Lightning checkpoint: it has no 'pytorch-lightning_version'",
        ),
        "folder": (directory / "folder.ckpt", "is a folder without .metadata"),
    }


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "empty", "state_dict", "folder"])
def test_a_bad_checkpoint_is_named_before_anything_is_written(kind, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    path, fault = _checkpoints(bad)[kind]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # the default logger (W&B, offline) would make runs/wandb/offline-run-* on instantiation
    code, err = run(["fit", "--config", str(ROOT / "configs/mlp/topk.yaml"), "--ckpt_path", str(path)], capsys)
    assert code == 2
    assert err[0].startswith(f"moe-lightning: error: checkpoint {str(path)!r} {fault}")
    assert "Traceback" not in "\n".join(err)
    assert files_under(work) == []


def test_good_checkpoints_and_lightnings_special_values_pass_the_check(tmp_path):
    check_checkpoint(LIGHTNING_CKPT)
    for special in (None, "last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/a.ckpt"):
        check_checkpoint(special)
    # a torch.distributed.checkpoint folder, as ModelParallelStrategy saves one
    (tmp_path / "sharded.ckpt").mkdir()
    (tmp_path / "sharded.ckpt" / ".metadata").write_bytes(b"")
    check_checkpoint(tmp_path / "sharded.ckpt")
    # what the check reads is what torch.load reads: the archive's data.pkl
    with zipfile.ZipFile(LIGHTNING_CKPT) as archive:
        assert any(name.endswith("/data.pkl") for name in archive.namelist())
    assert "pytorch-lightning_version" in torch.load(LIGHTNING_CKPT, weights_only=False, map_location="cpu")
    assert os.path.getsize(LIGHTNING_CKPT) > 0
