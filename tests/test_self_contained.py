"""The project stands alone: no file names a place outside the repository, and the data paths run from a copy of
the repository with nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Written in pieces so that this file does not match itself.
OUTSIDE = re.compile(r"\.\./" + "shared|" + "|".join(name + r"\.md" for name in ("GEOMETRY", "DESIGN", "STYLE")))


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the list of the project's files comes from git")
    return [ROOT / name for name in names if name and (ROOT / name).is_file()]


def test_no_file_names_a_place_outside_the_repository():
    hits = []
    for path in tracked_files():
        if path.suffix == ".png" or path.parent.name == "wikitext-2" and path.suffix == ".txt":
            continue  # images, and the bundled corpus, are data
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


@pytest.mark.integration  # pytest in a copy of the repository
def test_data_paths_run_from_a_lone_copy_of_the_repository(tmp_path):
    """The WikiText configs, the bundled data and the probe's default text, from a copy with no sibling folders."""
    repo = tmp_path / "lone" / "repo"
    for path in tracked_files():
        target = repo / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "offline", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    tests = [
        "tests/data/test_datamodules.py::test_wikitext_bundled_split_trains_and_caches_outside_the_package",
        "tests/test_training.py::test_every_shipped_config_runs_through_the_cli[configs/transformer/wikitext_topk.yaml]",
        "tests/commands/test_command.py::test_default_text_is_the_bundled_wikitext_test_split",
    ]
    # -m "": the shipped-config test runs here whatever its marks (the default suite leaves it to this copy)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(repo), "-m", ""]
    result = subprocess.run(
        [*command, *(str(repo / test) for test in tests)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
    # The copy, not this checkout, is what those tests imported.
    imported = subprocess.run(
        [sys.executable, "-c", "import moe_lightning; print(moe_lightning.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(imported).is_relative_to(repo)
