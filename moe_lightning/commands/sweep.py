"""``moe-lightning sweep``: train arm ∈ {topk, soft, dense_total, dense_active} × seeds for one config family, with
geometry logging, then write the report (``moe-lightning report``).

The arms (:data:`ARMS`) are the two routings and the dense baseline under both capacity controls:
``dense_total`` matches the MoE's total parameters (hidden ``E·H``, ``capacity_match: total``) and
``dense_active`` its active parameters, i.e. its FLOPs per token (hidden ``k·H``, ``capacity_match: active``).
``dense`` is accepted as another name of ``dense_total`` (:data:`ARM_ALIASES`), for older presets and runs.

A *preset* is a small YAML file (``configs/sweep/<name>.yaml``, or any path)::

    name: mlp_small
    family: mlp                      # mlp | transformer: a label for the report
    description: ...
    configs: [configs/mlp/topk.yaml, configs/trainer/cpu.yaml]   # LightningCLI configs, in order
    routings: [topk, soft, dense_total, dense_active]
    seeds: [0, 1, 2]
    overrides: {trainer: {max_epochs: 16}}                       # merged last, like one more --config
    routing_overrides: {soft: {model: {init_args: {lr: 0.001}}}}  # optional, per routing, merged after overrides
    variants:                        # optional: named routing families, usable in `routings` like a routing
      deepseek_aux_free: {configs: [configs/transformer/wikitext_deepseek.yaml]}
      deepseek_aux_loss:
        configs: [configs/transformer/wikitext_deepseek.yaml]
        overrides: {model: {init_args: {config: {load_balancing: aux_loss}}}}

A variant's job layers the variant's ``configs`` after the preset's and merges its ``overrides`` after the preset's
``overrides``; its routing comes from those configs (the sweep does not set it), and the report groups its runs
under the variant's name.

Each job is one ``moe-lightning fit`` subprocess (a crash stays in its job) with one more config written into its
directory, ``job.yaml``: the preset's ``overrides`` and ``routing_overrides[routing]``, ``seed_everything``,
the arm's ``model.init_args.config`` fields (``routing``, and ``capacity_match`` for a dense arm) and the
loggers (CSV always, into the job directory; W&B, offline when needed, when ``--loggers`` includes it). Layout::

    <out>/<name>/sweep.json                       the resolved preset
    <out>/<name>/<routing>-seed<k>/run.json       status (running | done | failed), return code, wall time, command
    <out>/<name>/<routing>-seed<k>/fit.log        the job's stdout and stderr
    <out>/<name>/<routing>-seed<k>/metrics.csv    CSVLogger history; config.yaml; geometry/step_*.json; wandb/
    <out>/<name>/report/                          tables, claims, plots, index.html

Jobs whose ``run.json`` says ``done`` are skipped, so re-running the same command resumes an interrupted sweep;
failed and interrupted jobs start again from scratch. A job that another sweep process on this host is running
(its ``run.json`` names a live pid) is skipped too, so two sweep processes can share one sweep, e.g. one per CPU
socket or one per ``--routings`` subset. A failed job is reported and the others go on. On CPU jobs
run one after another, or ``--devices N`` side by side with ``cores / N`` torch threads each (``OMP_NUM_THREADS``;
oversubscribed threads slow small CPU jobs several-fold). With GPUs, ``--devices N`` (default: the number of
visible GPUs) runs up to N at once, each on its own GPU through ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

LOGGERS = ("csv", "wandb")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = PROJECT_ROOT / "configs" / "sweep"
STATUS_FILE = "run.json"
#: Arm name -> the model config fields that make it (the sweep sets them in each job's config).
ARMS: dict[str, dict[str, str]] = {
    "topk": {"routing": "topk"},
    "soft": {"routing": "soft"},
    "dense_total": {"routing": "dense", "capacity_match": "total"},
    "dense_active": {"routing": "dense", "capacity_match": "active"},
}
#: Older arm names, still accepted: ``dense`` is ``dense_total`` (its jobs keep their ``dense-seed<k>`` names).
ARM_ALIASES: dict[str, str] = {"dense": "dense_total"}


@dataclass
class Preset:
    """A sweep preset (see the module docstring)."""

    name: str
    family: str
    configs: list[str]
    routings: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    routing_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def allowed_routings(self) -> tuple[str, ...]:
        """The arms, their aliases and the preset's variant names, what ``routings`` may list."""
        return (*ARMS, *ARM_ALIASES, *self.variants)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"sweep preset: name must be a non-empty string without '/', got {self.name!r}")
        if not self.configs:
            raise ValueError(f"sweep preset {self.name!r}: configs must list at least one LightningCLI config")
        self._check_variants()
        allowed = self.allowed_routings
        bad = [r for r in self.routings if r not in allowed]
        if bad or not self.routings:
            raise ValueError(
                f"sweep preset {self.name!r}: routings {self.routings!r} not allowed; choose from {allowed}"
            )
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"sweep preset {self.name!r}: seeds must be a non-empty list of ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.routings)) != len(self.routings):
            raise ValueError(f"sweep preset {self.name!r}: routings and seeds must not repeat")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"sweep preset {self.name!r}: overrides must be a mapping, got {type(self.overrides)}")
        if not isinstance(self.routing_overrides, dict) or any(
            r not in allowed or not isinstance(v, dict) for r, v in self.routing_overrides.items()
        ):
            raise ValueError(
                f"sweep preset {self.name!r}: routing_overrides must map routings {allowed} to config mappings, "
                f"got {self.routing_overrides!r}"
            )

    def _check_variants(self) -> None:
        if not isinstance(self.variants, dict):
            raise ValueError(f"sweep preset {self.name!r}: variants must be a mapping, got {type(self.variants)}")
        for name, variant in self.variants.items():
            builtin = (*ARMS, *ARM_ALIASES)
            if name in builtin or not isinstance(name, str) or not name or "/" in name or "-seed" in name:
                raise ValueError(
                    f"sweep preset {self.name!r}: variant name {name!r} must be a new name (not one of {builtin}), "
                    "without '/' or '-seed'"
                )
            if not isinstance(variant, dict) or set(variant) - {"configs", "overrides"}:
                raise ValueError(
                    f"sweep preset {self.name!r}: variant {name!r} must be a mapping with keys 'configs' and/or "
                    f"'overrides', got {variant!r}"
                )
            if not isinstance(variant.get("configs", []), list) or not isinstance(variant.get("overrides", {}), dict):
                raise ValueError(
                    f"sweep preset {self.name!r}: variant {name!r}: configs must be a list, overrides a mapping"
                )


def available_presets() -> list[str]:
    """Names of the presets shipped in ``configs/sweep/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_config_path(path: str) -> str:
    """A preset's config path: as given if it exists (relative to the working directory), else relative to the
    project root (so the shipped presets work from any directory)."""
    if Path(path).is_file():
        return str(Path(path).resolve())
    candidate = PROJECT_ROOT / path
    if candidate.is_file():
        return str(candidate)
    raise ValueError(f"sweep preset: config {path!r} does not exist (looked in {os.getcwd()} and {PROJECT_ROOT})")


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name (``mlp_small``) or a preset YAML file by path.

    Raises:
        ValueError: unknown name, missing file, or invalid fields; the message lists the shipped presets.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown sweep preset {name_or_path!r}: neither a file nor a shipped preset; "
            f"shipped presets: {', '.join(available_presets())}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    allowed = set(Preset.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"sweep preset {str(path)!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = {"name", "family", "configs"} - set(data)
    if missing:
        raise ValueError(f"sweep preset {str(path)!r}: missing keys {sorted(missing)}")
    preset = Preset(**data)
    preset.configs = [_resolve_config_path(c) for c in preset.configs]
    for variant in preset.variants.values():
        variant["configs"] = [_resolve_config_path(c) for c in variant.get("configs", [])]
    return preset


@dataclass
class Job:
    """One training run of a sweep."""

    routing: str
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.routing}-seed{self.seed}"


def plan_jobs(preset: Preset, out: str | Path) -> list[Job]:
    """Every job of ``preset`` under ``out/<preset.name>/``, routing-major."""
    root = Path(out).resolve() / preset.name
    return [Job(r, s, root / f"{r}-seed{s}") for r in preset.routings for s in preset.seeds]


def check_loggers(loggers: list[str]) -> list[str]:
    """Validated logger names in canonical order, with ``"csv"`` always included (``report`` reads it)."""
    bad = [name for name in loggers if name not in LOGGERS]
    if bad:
        raise ValueError(f"sweep: loggers {bad} not allowed; choose from {LOGGERS}")
    return sorted(set(loggers) | {"csv"}, key=LOGGERS.index)


def job_status(job_dir: Path) -> dict[str, Any] | None:
    """The job's ``run.json``, or None if it never started (or the file is unreadable)."""
    try:
        return json.loads((job_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_config(preset: Preset, job: Job, loggers: list[str], wandb_project: str) -> dict[str, Any]:
    """The config layered last on the preset's configs for ``job``."""
    logger_list: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(job.dir), "name": "", "version": ""},
        }
    ]
    if "wandb" in loggers:
        logger_list.append(
            {
                "class_path": "moe_lightning.lightning.loggers.AutoWandbLogger",
                "init_args": {
                    "save_dir": str(job.dir),
                    "project": wandb_project,
                    "name": f"{preset.name}/{job.name}",
                    "group": preset.name,
                    "tags": [preset.family, job.routing, f"seed{job.seed}"],
                },
            }
        )
    fixed: dict[str, Any] = {
        "seed_everything": job.seed,
        "trainer": {"logger": logger_list, "default_root_dir": str(job.dir), "enable_progress_bar": False},
    }
    arm = ARM_ALIASES.get(job.routing, job.routing)
    if arm in ARMS:  # a variant's routing comes from its own configs
        fixed["model"] = {"init_args": {"config": dict(ARMS[arm])}}
    variant = preset.variants.get(job.routing, {}).get("overrides", {})
    return _merge(_merge(_merge(preset.overrides, variant), preset.routing_overrides.get(job.routing, {})), fixed)


def job_command(preset: Preset, job: Job) -> list[str]:
    command = [sys.executable, "-m", "moe_lightning.commands", "fit"]
    for config in [*preset.configs, *preset.variants.get(job.routing, {}).get("configs", [])]:
        command += ["--config", config]
    return command + ["--config", str(job.dir / "job.yaml")]


def _start(
    preset: Preset,
    job: Job,
    loggers: list[str],
    wandb_project: str,
    gpu: int | None,
    threads: int | None,
    extra: list[str],
):
    if job.dir.exists():  # failed or interrupted: start again from a clean directory
        shutil.rmtree(job.dir)
    job.dir.mkdir(parents=True)
    (job.dir / "job.yaml").write_text(yaml.safe_dump(job_config(preset, job, loggers, wandb_project)))
    command = job_command(preset, job) + list(extra)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)  # CPU jobs side by side share the cores instead of oversubscribing
    status = {
        "preset": preset.name,
        "family": preset.family,
        "routing": job.routing,
        "variant": job.routing in preset.variants,
        "seed": job.seed,
        "status": "running",
        "returncode": None,
        "wall_s": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "started_unix": time.time(),
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "command": command,
    }
    _write_json(job.dir / STATUS_FILE, status)
    log = open(job.dir / "fit.log", "w")  # noqa: SIM115 - closed in _finish
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    status.update(pid=process.pid, host=socket.gethostname())
    _write_json(job.dir / STATUS_FILE, status)
    return process, log, status, time.perf_counter()


def _finish(job: Job, process, log, status: dict[str, Any], start: float) -> dict[str, Any]:
    log.close()
    status.update(
        returncode=process.returncode,
        status="done" if process.returncode == 0 else "failed",
        wall_s=round(time.perf_counter() - start, 2),
    )
    _write_json(job.dir / STATUS_FILE, status)
    return status


def _running_elsewhere(status: dict[str, Any]) -> bool:
    """A job marked running whose process is alive on this host (another sweep process runs it)."""
    if status.get("status") != "running" or status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def run_sweep(
    preset: Preset,
    out: str | Path = "runs/sweeps",
    loggers: list[str] | None = None,
    devices: int | None = None,
    wandb_project: str = "moe-lightning-sweep",
    extra_args: list[str] | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every job of ``preset`` not already done; return ``{job name: run.json contents}`` for all jobs.

    Args:
        preset: the sweep.
        out: parent directory; the sweep writes to ``out/<preset.name>/``.
        loggers: any of ``"csv"`` (always on) and ``"wandb"``.
        devices: jobs at once: one per GPU with CUDA (None = every visible GPU); on CPU, ``devices`` jobs side by
            side with ``cpu_count // devices`` torch threads each (``OMP_NUM_THREADS``; None = 1 job).
        wandb_project: W&B project of the jobs' runs.
        extra_args: more ``moe-lightning fit`` arguments for every job (e.g. ``--trainer.max_steps=10``).
        verbose: print one line per job.
    """
    import torch

    loggers = check_loggers(loggers or [])
    gpus = torch.cuda.device_count()
    if devices is None:
        devices = max(1, gpus)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"sweep: devices must be a positive int, got {devices!r}")
    threads = None if gpus or devices == 1 else max(1, (os.cpu_count() or 1) // devices)
    jobs = plan_jobs(preset, out)
    root = jobs[0].dir.parent
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "sweep.json", {**asdict(preset), "loggers": loggers, "extra_args": list(extra_args or [])})

    results: dict[str, dict[str, Any]] = {}
    pending = []
    for job in jobs:
        status = job_status(job.dir)
        if status is not None and status.get("status") == "done":
            results[job.name] = status
            if verbose:
                print(f"[sweep] {job.name}: done already, skipped", flush=True)
        else:
            pending.append(job)

    running: dict[int, tuple] = {}  # slot -> (job, process, log, status, start)
    while pending or running:
        for slot in range(devices):
            while slot not in running and pending:
                job = pending.pop(0)
                status = job_status(job.dir)  # again: another sweep process may have taken the job meanwhile
                if status is not None and (status.get("status") == "done" or _running_elsewhere(status)):
                    results[job.name] = status
                    if verbose:
                        print(f"[sweep] {job.name}: {status['status']} in another sweep process, skipped", flush=True)
                    continue
                if verbose:
                    print(f"[sweep] {job.name}: started in {job.dir}", flush=True)
                gpu = slot if gpus else None
                started = _start(preset, job, loggers, wandb_project, gpu, threads, extra_args or [])
                running[slot] = (job, *started)
        for slot, (job, process, log, status, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            results[job.name] = _finish(job, process, log, status, start)
            if verbose:
                outcome = results[job.name]
                line = f"[sweep] {job.name}: {outcome['status']} in {outcome['wall_s']:.1f} s"
                if outcome["status"] != "done":
                    log_path = job.dir / "fit.log"
                    line += f" (exit code {outcome['returncode']}; log {log_path}):\n{_tail(log_path)}"
                print(line, flush=True)
        if running:
            time.sleep(0.2)
    return {job.name: results[job.name] for job in jobs}


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
        results = run_sweep(preset, args.out, loggers, args.devices, args.wandb_project, extra)
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


if __name__ == "__main__":
    sys.exit(main())
