"""Print how the running environment's packages differ from a lock (constraints.txt): the releases a run without
the lock (``make test-latest``) tests beyond it. A report: it exits 0 whatever it finds.

    python scripts/lock_drift.py constraints.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path

# packages of any environment that the lock does not pin: the installer, and the project itself
UNLOCKED = {"pip", "moe-lightning"}


def normalized(name: str) -> str:
    """A package name as PyPI compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: str) -> dict[str, str]:
    """``{name: version}`` of the ``name==version`` lines of a lock's text."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, flags=re.MULTILINE)
    return {normalized(name): version for name, version in pins}


def installed_versions() -> dict[str, str]:
    """``{name: version}`` of the running environment, a local label (``+cpu``) dropped."""
    return {
        normalized(dist.metadata["Name"]): dist.version.split("+", 1)[0] for dist in importlib.metadata.distributions()
    }


def drift(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per installed package whose version is not the locked one, sorted by name."""
    lines = []
    for name in sorted(set(installed) - UNLOCKED):
        if name not in locked:
            lines.append(f"  {name} {installed[name]} (not in the lock)")
        elif locked[name] != installed[name]:
            lines.append(f"  {name} {locked[name]} -> {installed[name]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="the lock, constraints.txt")
    args = parser.parse_args(argv)
    lines = drift(locked_versions(args.lock.read_text(encoding="utf-8")), installed_versions())
    if lines:
        print(f"Releases that differ from {args.lock}:", *lines, sep="\n")
    else:
        print(f"Every installed package has the version of {args.lock}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
