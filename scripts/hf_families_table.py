"""Regenerate the family table of docs/hf-families.md from the installed transformers.

Builds each experts-interface family's tiny random model (``moe_lightning.adapters.hf_families``), finds its MoE
blocks, and writes the covered / not covered tables between the page's markers. ``--check`` only compares, and
exits 1 when the committed table differs (tests/adapters/test_hf_families.py makes the same comparison). Run it in
the locked environment (``make install``): the table belongs to the transformers of constraints.txt.

    python scripts/hf_families_table.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from moe_lightning.adapters.hf_families import coverage_table, experts_families, family_coverage

PAGE = Path(__file__).resolve().parents[1] / "docs" / "hf-families.md"
START, END = "<!-- family table: start -->", "<!-- family table: end -->"


def committed_table(page: str) -> str:
    """The table between the markers of ``page``'s text."""
    return page.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


@dataclass(frozen=True)
class FamilyTable:
    """What a generated table lists.

    Attributes:
        version: the transformers version it was generated from.
        covered: the covered families.
        not_covered: each family that is not covered, with its reason.
    """

    version: str
    covered: frozenset[str]
    not_covered: dict[str, str]

    @property
    def families(self) -> frozenset[str]:
        return self.covered | frozenset(self.not_covered)


def parse_table(table: str) -> FamilyTable:
    """The version and the families of a table that ``coverage_table`` wrote."""
    version = re.match(r"Generated from transformers (\S+): ", table)
    if version is None:
        raise ValueError("the family table does not start with 'Generated from transformers <version>: '")
    covered, not_covered = table.split("\nNot covered:\n", 1)
    return FamilyTable(
        version=version[1],
        covered=frozenset(re.findall(r"^\| `(\w+)` \|", covered, flags=re.MULTILINE)),
        not_covered=dict(re.findall(r"^\| `(\w+)` \| `[^`]*` \| (.*) \|$", not_covered, flags=re.MULTILINE)),
    )


def with_table(page: str, table: str) -> str:
    """``page``'s text with ``table`` between its markers."""
    head, rest = page.split(START, 1)
    return f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if the table is stale")
    args = parser.parse_args(argv)
    table = coverage_table([family_coverage(family) for family in experts_families()])
    page = PAGE.read_text(encoding="utf-8")
    if args.check:
        if committed_table(page) != table:
            print(f"{PAGE} is stale; run python scripts/hf_families_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(with_table(page, table), encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
