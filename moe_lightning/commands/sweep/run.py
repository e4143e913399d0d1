"""Running a sweep's jobs: each one ``moe-lightning fit`` subprocess with its ``run.json`` status, side by side on
the devices, skipping the jobs done already or running in another sweep process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from moe_lightning.commands.checkpoint import CheckpointError, check_checkpoint
from moe_lightning.commands.sweep.job import Job, check_loggers, job_command, job_config, plan_jobs
from moe_lightning.commands.sweep.preset import Preset
from moe_lightning.commands.sweep.progress import ProgressLines

STATUS_FILE = "run.json"
# A job's folder is its run folder (moe_lightning.commands.run_folder): the names a continued job is found by.
CHECKPOINTS, LAST_CHECKPOINT, CONFIG_FILE = "checkpoints", "last.ckpt", "config.yaml"


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


def _fresh_command(preset: Preset, job: Job, loggers: list[str], wandb_project: str) -> list[str]:
    """A clean job folder with its ``job.yaml``, and the ``moe-lightning fit`` command that starts the job."""
    if job.dir.exists():  # stopped before its first checkpoint (or failed at its config): nothing worth keeping
        shutil.rmtree(job.dir)
    job.dir.mkdir(parents=True)
    (job.dir / "job.yaml").write_text(yaml.safe_dump(job_config(preset, job, loggers, wandb_project)))
    return job_command(preset, job)


def _continue_command(job: Job) -> list[str]:
    """The ``moe-lightning fit`` command that continues the job from its ``last.ckpt``: the config the job saved
    when it first started (its run folder's ``config.yaml``), so the continued job is the job as it began.

    Raises:
        CheckpointError: ``last.ckpt`` is not a checkpoint that Lightning can load, or ``config.yaml`` is missing;
            the message names the file.
    """
    checkpoint = job.dir / CHECKPOINTS / LAST_CHECKPOINT
    check_checkpoint(checkpoint)
    config = job.dir / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{config} is missing: the job's {checkpoint} cannot be continued without its config")
    return [sys.executable, "-m", "moe_lightning.commands", "fit", "--config", str(config), "--ckpt_path", "last"]


def _start(
    preset: Preset,
    job: Job,
    command: list[str],
    gpu: int | None,
    threads: int | None,
    continued: bool,
) -> _Running:
    """Start ``command`` for ``job`` (appending to its ``fit.log`` when it continues the job) and write its
    ``run.json``."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)  # CPU jobs side by side share the cores instead of oversubscribing
    earlier = job_status(job.dir) if continued else None
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
        # One entry per sitting that continued the job from its last.ckpt.
        "continued": [*((earlier or {}).get("continued") or []), time.strftime("%Y-%m-%dT%H:%M:%S")]
        if continued
        else [],
    }
    _write_json(job.dir / STATUS_FILE, status)
    log = open(job.dir / "fit.log", "a" if continued else "w")  # noqa: SIM115 - closed in _Running.finish
    if continued:
        log.write(f"\n[sweep] continued from {CHECKPOINTS}/{LAST_CHECKPOINT} at {status['started']}\n")
        log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    status.update(pid=process.pid, host=socket.gethostname())
    _write_json(job.dir / STATUS_FILE, status)
    return _Running(job, process, log, status, time.perf_counter())


def _failed_without_start(job: Job, preset: Preset, error: Exception) -> dict[str, Any]:
    """The ``run.json`` of a job that could not be started (its checkpoint unreadable), which says why."""
    status = {**(job_status(job.dir) or {}), "preset": preset.name, "routing": job.routing, "seed": job.seed}
    status.update(status="failed", returncode=None, wall_s=0.0, error=str(error))
    _write_json(job.dir / STATUS_FILE, status)
    return status


def _stopped_with_checkpoint(jobs: list[Job]) -> list[Job]:
    """The jobs that stopped before their end (failed, or killed while running) with a ``last.ckpt`` in their
    folder, and that no other sweep process runs now."""
    found = []
    for job in jobs:
        status = job_status(job.dir)
        if status is not None and (status.get("status") == "done" or _running_elsewhere(status)):
            continue
        if (job.dir / CHECKPOINTS / LAST_CHECKPOINT).exists():
            found.append(job)
    return found


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
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run every job of ``preset`` not already done; return ``{job name: run.json contents}`` for all jobs.

    A job that stopped before its end (failed, or killed) with a ``checkpoints/last.ckpt`` in its folder is
    continued from it with ``resume``, as ``moe-lightning fit --config <job>/config.yaml --ckpt_path last`` (one run
    folder, one history); without ``resume`` the sweep refuses to start, so that no checkpoint is thrown away
    unasked. A job whose ``last.ckpt`` cannot be read fails, with the file named in its ``run.json`` (``error``),
    and the others go on; delete its folder to start it again. Other unfinished jobs start again from scratch.

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
        resume: continue the jobs that stopped with a checkpoint, from their ``last.ckpt``.

    Raises:
        ValueError: bad ``devices`` or ``loggers``; without ``resume``, jobs that stopped with a checkpoint (the
            message names each ``last.ckpt`` and the ``--resume`` flag).
    """
    loggers = check_loggers(loggers or [])
    devices, gpus, threads = _slots(devices)
    jobs = plan_jobs(preset, out)
    stopped = _stopped_with_checkpoint(jobs)
    if stopped and not resume:
        files = "; ".join(str(job.dir / CHECKPOINTS / LAST_CHECKPOINT) for job in stopped)
        raise ValueError(
            f"sweep: {len(stopped)} job(s) stopped before their end with a checkpoint: {files}; continue them with "
            "--resume, or delete their folders to start them again"
        )
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
                continued = (job.dir / CHECKPOINTS / LAST_CHECKPOINT).exists()
                if continued and not resume:  # stopped with a checkpoint since the check above (another process)
                    results[job.name] = job_status(job.dir) or {"status": "failed"}
                    _say(verbose, f"[sweep] {job.name}: stopped with a checkpoint in {job.dir}; not started (--resume)")
                    continue
                try:
                    if continued:
                        command = _continue_command(job)
                    else:
                        command = _fresh_command(preset, job, loggers, wandb_project)
                except CheckpointError as error:
                    results[job.name] = _failed_without_start(job, preset, error)
                    _say(verbose, f"{position[job.name]} {job.name}: failed, not continued: {error}")
                    continue
                verb = "continued from its last checkpoint" if continued else "started"
                _say(verbose, f"{position[job.name]} {job.name}: {verb} in {job.dir}")
                gpu = slot if gpus else None
                running[slot] = _start(preset, job, command + list(extra_args or []), gpu, threads, continued)
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
