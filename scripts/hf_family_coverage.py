"""Report the Hugging Face families of the installed transformers that the family table of docs/hf-families.md does
not list, each covered or not, with its reason.

The table belongs to the transformers version of the lock (constraints.txt), and the test suite checks exactly its
families. A newer transformers (``make test-latest`` installs the newest releases) may add families: this builds a
tiny random model of each (``moe_lightning.adapters.hf_families.family_coverage``) and prints what the adapters make
of it. It is a report: it exits 0 whatever it finds. A family worth listing goes into the table when the lock moves
to that transformers (``make lock``, then ``python scripts/hf_families_table.py``).

    python scripts/hf_family_coverage.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

from moe_lightning.adapters.hf_families import FamilyCoverage, experts_families, family_coverage

ROOT = Path(__file__).resolve().parents[1]


def _table_script():
    """scripts/hf_families_table.py, which owns the table's format."""
    path = ROOT / "scripts" / "hf_families_table.py"
    spec = importlib.util.spec_from_file_location("hf_families_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up here
    spec.loader.exec_module(module)
    return module


def describe(coverage: FamilyCoverage) -> str:
    """One line: covered with what the table would show, or not covered with the reason."""
    if coverage.covered:
        return (
            f"covered: {coverage.model_class}, {len(coverage.views)} MoE views, gates from {coverage.routing}, "
            f"{coverage.jacobian} expert Jacobians, shared experts: {coverage.shared or '-'}"
        )
    return f"not covered: {coverage.reason}"


def _coverage(family: str) -> FamilyCoverage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return family_coverage(family)
    except Exception as error:  # noqa: BLE001 - a report: an unexpected error is this family's reason
        return FamilyCoverage(family, "", "", reason=f"the coverage check raised {type(error).__name__}: {error}")


def report(page: str) -> str:
    """The report for the docs page's text ``page`` against the installed transformers."""
    import transformers

    script = _table_script()
    table = script.parse_table(script.committed_table(page))
    installed = experts_families()
    new = sorted(set(installed) - table.families)
    gone = sorted(table.families - set(installed))
    lines = [
        f"Hugging Face families: transformers {transformers.__version__} is installed; the table of "
        f"docs/hf-families.md lists the {len(table.families)} families of transformers {table.version}."
    ]
    if new:
        lines.append(f"{len(new)} families the table does not list (reported, not tested):")
        lines += [f"  {family}: {describe(_coverage(family))}" for family in new]
    else:
        lines.append("No family beyond the table.")
    if gone:
        lines.append(f"In the table but not in the installed transformers: {', '.join(gone)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(report((ROOT / "docs" / "hf-families.md").read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
