"""``moe-lightning probe MODEL [options]``: the command line of the pretrained-model probe; its flags are made from
the fields of :class:`~moe_lightning.commands.probe.options.ProbeOptions`.

Examples:
    moe-lightning probe mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --max-tokens 512 --out probe-mixtral
    moe-lightning probe ./my-olmoe-checkpoint --text notes.txt --layers 'model.layers.1*.mlp'
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from moe_lightning.commands.probe.options import DEFAULT_TEXT_FILE, add_option_arguments, options_from_args

PROG = "moe-lightning probe"


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-lightning probe`` argument parser: the model and the text, then one flag per probe option."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Probe the geometry (Jacobian spectra, weighted PCA, expert alignment, Grassmann subspaces) of every MoE "
            "layer of a pretrained Hugging Face checkpoint on a text set. Every MoE family of the installed "
            "transformers built on its experts interface is supported (an unsupported model's error lists them)."
        ),
    )
    parser.add_argument("model", help="local checkpoint directory or hub name (cache only when offline)")
    parser.add_argument(
        "--text",
        default=None,
        help=f"UTF-8 text file, one document per line, or bundled:NAME for a file shipped with the package "
        f"(default: {DEFAULT_TEXT_FILE}, the WikiText-2 test split)",
    )
    add_option_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    """``moe-lightning probe MODEL [options]``; returns the exit code (2 on a bad model, text or option)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage/error (or --help)
        return int(exit_.code or 0)
    # transformers and the probe load once the arguments have parsed.
    from moe_lightning.commands.probe.run import format_summary, probe_and_write
    from moe_lightning.commands.probe.write import default_out_dir

    try:
        options = options_from_args(args)
        options = replace(options, out_dir=options.out_dir or default_out_dir(args.model))
        run = probe_and_write(args.model, args.text, options)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(run.reports, run.peak_memory))
    print(f"wrote {len(run.paths)} files to {options.out_dir}:")
    for path in run.paths:
        print(f"  {path}")
    return 0
