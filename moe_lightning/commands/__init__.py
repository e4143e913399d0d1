"""The ``moe-lightning`` command: a dispatcher that knows every subcommand by name, module and one line of help,
and imports a subcommand's module only when that subcommand runs.

Lightning, transformers, the plotting libraries and wandb take seconds to import, so ``moe-lightning --help`` and
a mistyped command answer from here without them. ``fit | validate | test | predict`` run through LightningCLI
(:mod:`moe_lightning.commands.trainer`), whose jsonargparse help lists every option (``moe-lightning fit --help``);
``sweep``, ``report``, ``probe`` and ``dashboard`` are the ``main(argv)`` of their modules.

Examples:
    moe-lightning --help
    moe-lightning fit --config configs/mlp/topk.yaml --config configs/trainer/cpu.yaml
    moe-lightning report runs/sweeps/mlp-small
"""

from __future__ import annotations

import argparse
import importlib
import sys

PROG = "moe-lightning"
# LightningCLI's subcommands (moe_lightning.commands.trainer), with one line each for the top-level help.
TRAINER_COMMANDS: dict[str, str] = {
    "fit": "train a model and, with GeometryMonitor, print its geometry and write its report",
    "validate": "run one evaluation epoch over the validation set",
    "test": "run one evaluation epoch over the test set",
    "predict": "run the model's predict_step over the prediction data",
}
# The project's own subcommands: name -> (the module whose main(argv) runs it, one line for the top-level help).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": (
        "moe_lightning.commands.sweep",
        "train routing arms x seeds of a preset with geometry logging, then the report",
    ),
    "report": ("moe_lightning.commands.report", "results and claims tables, plots and one HTML page from logged runs"),
    "probe": ("moe_lightning.commands.probe.command", "the geometry of every MoE layer of a pretrained HF checkpoint"),
    "dashboard": ("moe_lightning.commands.dashboard", "create or update the W&B workspace of the geometry"),
}
# LightningCLI's own options before the subcommand: option -> whether it takes the next word as its value.
TRAINER_OPTIONS: dict[str, bool] = {"-c": True, "--config": True, "--print_config": False}
HELP_OPTIONS = ("-h", "--help")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser. It only prints the help and the usage errors: each command parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train Mixture-of-Experts models with PyTorch Lightning, and probe their geometry.",
        epilog=f"`{PROG} COMMAND --help` lists a command's options (for fit, validate, test and predict, every "
        "model, data and trainer argument of LightningCLI).",
    )
    parser.add_argument(
        "-c", "--config", metavar="CONFIG", help="a config file for fit|validate|test|predict (before the command)"
    )
    parser.add_argument(
        "--print_config",
        nargs="?",
        metavar="flags",
        help="fit|validate|test|predict: print the configuration and exit (before the command)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, summary in TRAINER_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    for name, (_, summary) in EXTRA_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def _scan(args: list[str]) -> tuple[str | None, bool, str | None]:
    """``(command, help asked, unknown option)`` from the words before the command, as LightningCLI reads them."""
    index = 0
    while index < len(args):
        word = args[index]
        if not word.startswith("-") or word == "-":
            return word, False, None
        if word in HELP_OPTIONS:
            return None, True, None
        option = word.split("=", 1)[0]
        if option.startswith("-c") and not option.startswith("--"):
            option, attached = "-c", len(word) > 2  # -cFILE, as argparse reads it
        else:
            attached = "=" in word
        if option not in TRAINER_OPTIONS:
            return None, False, word
        index += 2 if TRAINER_OPTIONS[option] and not attached else 1
    return None, False, None


def main(argv: list[str] | None = None) -> int | None:
    """Entry point of the ``moe-lightning`` console script. Returns the exit code.

    Args:
        argv: the arguments after ``moe-lightning`` (default: ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        return importlib.import_module(EXTRA_COMMANDS[args[0]][0]).main(args[1:])
    command, wants_help, unknown = _scan(args)
    if wants_help:
        build_parser().print_help()
        return 0
    if unknown is not None:
        build_parser().error(f"unrecognized option {unknown!r} (a command's options go after its name)")
    if command in EXTRA_COMMANDS:
        build_parser().error(f"{command} takes its options after its name: {PROG} {command} --help")
    if command is not None and command not in TRAINER_COMMANDS:
        build_parser().error(
            f"unknown command {command!r}; choose from {', '.join([*TRAINER_COMMANDS, *EXTRA_COMMANDS])}"
        )
    if not args:
        build_parser().error(f"a command is required; choose from {', '.join([*TRAINER_COMMANDS, *EXTRA_COMMANDS])}")
    # A trainer command, or LightningCLI's options alone (it reports what is missing).
    from moe_lightning.commands.trainer import main as trainer_main

    # None lets LightningCLI read sys.argv itself (it warns when given both).
    return trainer_main(None if argv is None else args)
