"""``moe-lightning report``: the command line of :func:`~moe_lightning.report.build.build_report`.

Example::

    moe-lightning report runs/sweep-mlp --out runs/sweep-mlp/report
    moe-lightning report runs/a runs/b --layer-mode each --threshold 0.05
"""

from __future__ import annotations

import argparse
import sys
import warnings

from moe_lightning.analysis.choices import FORMATS, LAYER_MODES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lightning report",
        description="Results table (mean ± std over seeds), the papers' claims with verdicts, plots and one HTML page "
        "from sweep job directories, CSV log directories and W&B offline runs (searched recursively).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or directories containing runs")
    parser.add_argument("--out", default=None, help="output directory (default: <first RUN_DIR>/report)")
    parser.add_argument(
        "--layer-mode",
        choices=LAYER_MODES,
        default="mean",
        help="mean: average each seed's value over layers (default); each: one row per layer",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.1, help="C3: absolute threshold on align_mean_offdiag (default 0.1)"
    )
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        dest="formats",
        help="outputs to write (default: all of md csv png html)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``moe-lightning report``.

    Args:
        argv: the arguments after ``report``.

    Returns:
        0 on success, with ``moe-lightning: warning: ...`` on stderr for each run that could not be read; 2 (after
        ``moe-lightning: error: ...``) for bad input or when no run could be read.
    """
    args = _parser().parse_args(argv)
    # The report stack (pandas, matplotlib, torch) loads once the arguments have parsed.
    from moe_lightning.analysis.log_dirs import RunLogWarning
    from moe_lightning.report.build import build_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunLogWarning)
        try:
            written = build_report(args.run_dirs, args.out, args.layer_mode, args.threshold, tuple(args.formats))
        except ValueError as error:
            written = None
            failure = error
    if written is None:
        print(f"moe-lightning: error: {failure}", file=sys.stderr)
    # A run that could not be read is named on the terminal, not only in the report's tables.
    for warning in caught:
        if issubclass(warning.category, RunLogWarning):
            print(f"moe-lightning: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if written is None:
        return 2
    for path in written:
        print(path)
    return 0
