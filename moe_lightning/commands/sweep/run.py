"""Running a sweep's jobs: each one ``moe-lightning fit`` subprocess with its ``run.json`` status, side by side on
the devices, skipping the jobs done already or running in another sweep process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from moe_lightning.commands.sweep.job import Job, check_loggers, job_command, job_config, plan_jobs
from moe_lightning.commands.sweep.preset import Preset
from moe_lightning.commands.sweep.progress import ProgressLines

STATUS_FILE = "run.json"


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


@dataclass
class _Running:
    """A job whose ``moe-lightning fit`` subprocess was started, with its log file and ``run.json`` status."""

    job: Job
    process: subprocess.Popen
    log: IO[str]
    status: dict[str, Any]
    start: float

    def finish(self) -> dict[str, Any]:
        """The status of the ended process, written to its ``run.json``."""
        self.log.close()
        self.status.update(
            returncode=self.process.returncode,
            status="done" if self.process.returncode == 0 else "failed",
            wall_s=round(time.perf_counter() - self.start, 2),
        )
        _write_json(self.job.dir / STATUS_FILE, self.status)
        return self.status


def _start(
    preset: Preset,
    job: Job,
    loggers: list[str],
    wandb_project: str,
    gpu: int | None,
    threads: int | None,
    extra: list[str],
) -> _Running:
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
    log = open(job.dir / "fit.log", "w")  # noqa: SIM115 - closed in _Running.finish
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    status.update(pid=process.pid, host=socket.gethostname())
    _write_json(job.dir / STATUS_FILE, status)
    return _Running(job, process, log, status, time.perf_counter())


def _slots(devices: int | None) -> tuple[int, int, int | None]:
    """``(jobs at once, GPUs, torch threads per CPU job)``: one job per visible GPU by default; CPU jobs side by
    side share the cores (None: one job alone keeps torch's own default)."""
    import torch

    gpus = torch.cuda.device_count()
    if devices is None:
        devices = max(1, gpus)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"sweep: devices must be a positive int, got {devices!r}")
    threads = None if gpus or devices == 1 else max(1, (os.cpu_count() or 1) // devices)
    return devices, gpus, threads


def _done_already(jobs: list[Job], verbose: bool) -> tuple[dict[str, dict[str, Any]], list[Job]]:
    """``({job name: status} of the jobs done in an earlier run, the other jobs in order)``."""
    results: dict[str, dict[str, Any]] = {}
    pending = []
    for job in jobs:
        status = job_status(job.dir)
        if status is not None and status.get("status") == "done":
            results[job.name] = status
            _say(verbose, f"[sweep] {job.name}: done already, skipped")
        else:
            pending.append(job)
    return results, pending


def _taken(job: Job) -> dict[str, Any] | None:
    """The job's status if another sweep process has finished it or is running it on this host, else None."""
    status = job_status(job.dir)
    if status is not None and (status.get("status") == "done" or _running_elsewhere(status)):
        return status
    return None


def _running_elsewhere(status: dict[str, Any]) -> bool:
    """A job marked running whose process is alive on this host (another sweep process runs it)."""
    if status.get("status") != "running" or status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


def _outcome_line(prefix: str, job: Job, outcome: dict[str, Any]) -> str:
    """One line on how a job ended; for a failed job, its exit code and the tail of its log."""
    line = f"{prefix} {job.name}: {outcome['status']} in {outcome['wall_s']:.1f} s"
    if outcome["status"] != "done":
        log_path = job.dir / "fit.log"
        line += f" (exit code {outcome['returncode']}; log {log_path}):\n{_tail(log_path)}"
    return line


def _say(verbose: bool, line: str) -> None:
    if verbose:
        print(line, flush=True)


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
        verbose: print a line when a job starts and ends, and its step (from its ``progress.json``) at most every
            10 s while it runs.
    """
    loggers = check_loggers(loggers or [])
    devices, gpus, threads = _slots(devices)
    jobs = plan_jobs(preset, out)
    root = jobs[0].dir.parent
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "sweep.json", {**asdict(preset), "loggers": loggers, "extra_args": list(extra_args or [])})
    results, pending = _done_already(jobs, verbose)
    position = {job.name: f"[{index}/{len(jobs)}]" for index, job in enumerate(jobs, 1)}
    progress = ProgressLines()
    running: dict[int, _Running] = {}  # device slot -> the job running on it
    while pending or running:
        for slot in range(devices):
            while slot not in running and pending:
                job = pending.pop(0)
                taken = _taken(job)  # checked again: another sweep process may have taken the job meanwhile
                if taken is not None:
                    results[job.name] = taken
                    _say(verbose, f"[sweep] {job.name}: {taken['status']} in another sweep process, skipped")
                    continue
                _say(verbose, f"{position[job.name]} {job.name}: started in {job.dir}")
                gpu = slot if gpus else None
                running[slot] = _start(preset, job, loggers, wandb_project, gpu, threads, extra_args or [])
        for slot, run in list(running.items()):
            if run.process.poll() is None:
                continue
            del running[slot]
            results[run.job.name] = run.finish()
            _say(verbose, _outcome_line(position[run.job.name], run.job, results[run.job.name]))
        if running:
            now = time.perf_counter()
            shown = [(position[r.job.name], r.job.name, r.job.dir, r.start) for r in running.values()]
            for line in progress.lines(shown, now):
                _say(verbose, line)
            time.sleep(0.2)
    return {job.name: results[job.name] for job in jobs}
