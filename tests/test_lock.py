"""The lock (constraints.txt) against what it locks: pyproject's requirements and the Makefile's torch; and
scripts/lock_drift.py, which ``make test-latest`` uses to print the releases it tests beyond the lock."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from helpers import load_script
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, which the lock is for

ROOT = Path(__file__).resolve().parents[1]
LOCK = (ROOT / "constraints.txt").read_text(encoding="utf-8")
EXTRAS = ("dev", "hf", "docs", "libs")


@pytest.fixture(scope="module")
def drift_script():
    return load_script(ROOT / "scripts" / "lock_drift.py")


def test_the_lock_pins_every_requirement_within_its_range(drift_script) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    locked = drift_script.locked_versions(LOCK)
    environment = {**default_environment(), "python_version": "3.11", "sys_platform": "linux"}
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = drift_script.normalized(requirement.name)
        assert name in locked, f"{requirement} is not in constraints.txt: make lock"
        assert requirement.specifier.contains(locked[name]), f"constraints.txt has {name}=={locked[name]}"
        if importlib.metadata.version(requirement.name) != locked[name]:
            continue  # an environment off the lock (make test-latest): the locked release's metadata is not here
        for extra in requirement.extras:  # jsonargparse[signatures]: its extra's packages are locked too
            for sub in importlib.metadata.requires(requirement.name) or []:
                sub_requirement = Requirement(sub)
                if sub_requirement.marker is not None and sub_requirement.marker.evaluate(
                    {**environment, "extra": extra}
                ):
                    assert drift_script.normalized(sub_requirement.name) in locked, sub


def test_the_lock_keeps_the_makefiles_torch() -> None:
    torch = re.search(r"^TORCH := (\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert torch is not None
    assert re.search(rf"^torch=={re.escape(torch[1])}$", LOCK, flags=re.MULTILINE)


def test_lock_drift_names_each_package_off_the_lock(drift_script, tmp_path, capsys) -> None:
    installed = drift_script.installed_versions()
    assert installed["pytest"] == importlib.metadata.version("pytest")
    locked = {name: version for name, version in installed.items() if name not in drift_script.UNLOCKED}
    locked["pytest"] = "0.0.1"
    del locked["packaging"]
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a header\n" + "".join(f"{n}=={v}\n    # via x\n" for n, v in locked.items()), encoding="utf-8")
    assert drift_script.locked_versions(lock.read_text(encoding="utf-8")) == locked
    assert drift_script.drift(locked, installed) == [
        f"  packaging {installed['packaging']} (not in the lock)",
        f"  pytest 0.0.1 -> {installed['pytest']}",
    ]
    assert drift_script.main([str(lock)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == drift_script.drift(locked, installed)
    assert drift_script.drift(installed, installed) == []
