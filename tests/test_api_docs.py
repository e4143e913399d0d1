"""The API reference shows each public package's ``__all__``, grouped, and nothing else: every ``::: name`` line of
``docs/api/*.md`` is one public name of one package, and every public name has its line."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api"
# The packages whose names the reference documents, one page each (the top level re-exports some of them).
PACKAGES = (
    "adapters",
    "analysis",
    "callbacks",
    "commands.probe",
    "data",
    "distributed",
    "geometry",
    "lightning",
    "monitors",
    "monitors.hf",
    "nn",
    "report",
)


def documented() -> dict[str, list[str]]:
    """``package -> [name, ...]`` from the ``::: moe_lightning.<package>.<name>`` lines of the API pages."""
    found: dict[str, list[str]] = {}
    for page in sorted(API.glob("*.md")):
        for identifier in re.findall(r"^::: (\S+)\s*$", page.read_text(), flags=re.MULTILINE):
            package, _, name = identifier.removeprefix("moe_lightning.").rpartition(".")
            found.setdefault(package, []).append(name)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_page_documents_exactly_its_public_names(package):
    names = documented().get(package, [])
    public = importlib.import_module(f"moe_lightning.{package}").__all__
    assert len(names) == len(set(names)), f"documented twice: {sorted({n for n in names if names.count(n) > 1})}"
    assert sorted(names) == sorted(public), (
        f"moe_lightning.{package}: undocumented {sorted(set(public) - set(names))}, "
        f"not public {sorted(set(names) - set(public))}"
    )


def test_every_documented_name_belongs_to_a_public_package():
    assert set(documented()) <= set(PACKAGES), sorted(set(documented()) - set(PACKAGES))
