"""The command line of ``moe-lightning sweep``: the preset, narrowed by ``--routings`` and ``--seeds``, its jobs
run (or listed with ``--dry-run``), then the report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from moe_lightning.commands.sweep.job import check_loggers, job_command, plan_jobs
from moe_lightning.commands.sweep.preset import available_presets, load_preset
from moe_lightning.commands.sweep.run import run_sweep


def _csv(text: str, cast=str) -> list:
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lightning sweep",
        description="Train routing x seeds for one preset with geometry logging, then write the report.",
        epilog="Arguments after `--` go to every `moe-lightning fit` job, e.g. `-- --trainer.max_steps=50`. "
        f"Shipped presets: {', '.join(available_presets())}.",
    )
    parser.add_argument("preset", help="a shipped preset name or a preset YAML file")
    parser.add_argument("--out", default="runs/sweeps", help="parent directory (default: runs/sweeps)")
    parser.add_argument(
        "--routings",
        help="comma-separated arms or preset variants, e.g. topk,dense_active or deepseek_aux_loss,deepseek_aux_free "
        "(default: the preset's routings)",
    )
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--num-seeds", type=int, help="seeds 0..n-1 (instead of --seeds)")
    parser.add_argument(
        "--loggers", default="csv,wandb", help="csv and/or wandb (default: csv,wandb; csv is always on)"
    )
    parser.add_argument("--wandb-project", default="moe-lightning-sweep")
    parser.add_argument(
        "--devices",
        type=int,
        help="jobs at once: one per GPU (default: all visible GPUs); on CPU, N jobs with cores/N threads each "
        "(default 1)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the jobs that stopped before their end (killed or failed) from their last.ckpt; without it, "
        "the sweep refuses to start while such a job's folder holds one",
    )
    parser.add_argument("--no-report", action="store_true", help="do not run `moe-lightning report` afterwards")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and their commands, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``moe-lightning sweep``. Exit code 0 when every job is done, 1 when some failed, 2 on bad arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = load_preset(args.preset)
        if args.seeds and args.num_seeds is not None:
            raise ValueError("sweep: give --seeds or --num-seeds, not both")
        if args.num_seeds is not None and args.num_seeds < 1:
            raise ValueError(f"sweep: --num-seeds must be >= 1, got {args.num_seeds}")
        changes: dict[str, list] = {}
        if args.routings:
            changes["routings"] = _csv(args.routings)
        if args.seeds:
            changes["seeds"] = _csv(args.seeds, int)
        if args.num_seeds is not None:
            changes["seeds"] = list(range(args.num_seeds))
        preset = replace(preset, **changes)  # validated again by Preset.__post_init__
        loggers = check_loggers(_csv(args.loggers))
        if args.dry_run:
            for job in plan_jobs(preset, args.out):
                print(f"{job.name}: {' '.join(job_command(preset, job) + extra)}")
            return 0
        results = run_sweep(preset, args.out, loggers, args.devices, args.wandb_project, extra, resume=args.resume)
    except ValueError as error:
        print(f"moe-lightning sweep: error: {error}", file=sys.stderr)
        return 2
    failed = [name for name, status in results.items() if status.get("status") != "done"]
    done = len(results) - len(failed)
    print(f"[sweep] {done}/{len(results)} jobs done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if not args.no_report and done:
        root = Path(args.out) / preset.name
        try:
            from moe_lightning.commands.report import main as report_main
        except ImportError as error:  # pragma: no cover - the report module ships with the package
            print(f"[sweep] report skipped: {error}", file=sys.stderr)
        else:
            code = report_main([str(root), "--out", str(root / "report")])
            if code:
                print(f"[sweep] report exited with code {code}", file=sys.stderr)
    return 1 if failed else 0
