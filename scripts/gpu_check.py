"""The GPU run: every check that needs CUDA, in one command of at most 10 minutes, into one output folder.

Steps, each in a process of its own with its own time limit, its output in ``<out>/<step>.log``; a failure or a
timeout is recorded (status and the last lines of the log) and the next step runs:

- ``gpu-tests``: ``pytest -m gpu tests/test_gpu.py`` (``gpu_tests.xml``);
- ``fits``: every shipped config of ``configs/`` through ``moe-lightning fit`` with ``configs/trainer/gpu.yaml``
  (bf16-mixed), a few steps, GeometryMonitor, RouterMonitor and CurvatureMonitor attached, logged to CSV
  (``scripts/gpu_check_fits.py``; one row per config, ``fits/<config>/metrics.csv``);
- ``observation``: a short fit with and without the monitors ends in identical weights
  (``scripts/gpu_check_observation.py``, ``observation.json``);
- ``benchmark-moe``: ``scripts/benchmark_moe.py --device cuda``, our dispatch paths against Hugging Face's
  Mixtral block (eager, ``grouped_mm``, ``batched_mm``) and the dense FFN (``benchmark_moe.json``);
- ``benchmark-callbacks``: ``scripts/benchmark_callbacks.py --device cuda``, the monitors' overhead on the WikiText
  transformer (``benchmark_callbacks.json``);
- ``benchmark-probe``: the real-scale probe benchmark, ``scripts/benchmark_*probe*.py``, where one exists (status
  ``absent`` otherwise);
- ``sweep`` (optional: only when enough of the 10 minutes is left): ``moe-lightning sweep transformer_small``, one
  seed, on the GPU.

``--cpu`` runs the same steps at tiny sizes on the CPU (a rehearsal that keeps this script from rotting: about
40 s on 2 cores); there the sweep only plans its jobs (``--dry-run``), and without CUDA the GPU tests are skipped
(``skipped: no CUDA``: every one of them would skip).

Prints one table, step | status | seconds | key figure, under the device, the torch version and the command; writes
it to ``<out>/summary.md`` and ``<out>/summary.json``, and the whole folder to ``<out>/gpu-check.tar.gz``. Exits 0
when every step is ok or skipped by design, 1 otherwise, 2 when it cannot start (no CUDA without ``--cpu``).

Usage::

    scripts/gpu_check.sh                    # on a machine with a GPU; output in $OUT or gpu-check-out/
    scripts/gpu_check.sh --cpu /tmp/check   # the rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# scripts/ is on the path of a script run from it
from gpu_check_steps import SKIPPED_NO_CUDA, SKIPPED_OPTIONAL, Step, installed, plan

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 570.0  # the steps' share of the 10 minutes; the rest is start-up and the summary
CPU_BUDGET_S = 240.0
ARCHIVE = "gpu-check.tar.gz"
# The statuses of a complete run: a step that ran, or one that cannot run by design (the GPU tests under --cpu, a
# benchmark script the repository does not have, a config whose data would have to be downloaded).
GOOD = ("ok", "absent", SKIPPED_NO_CUDA, "needs download")
# Packages that the package or a step imports and that a GPU image may lack; the summary names the missing ones.
DEPENDENCIES = ("lightning", "jsonargparse", "docstring_parser", "typeshed_client", "transformers", "wandb", "datasets")


def missing_modules() -> list[str]:
    return [name for name in DEPENDENCIES if not installed(name)]


def tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_step(step: Step, out: Path, env: dict[str, str], limit_s: float) -> dict:
    """Run one step's command under ``limit_s``; its status never raises."""
    log = out / f"{step.name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(f"$ {shlex.join(step.command)}\n")
        handle.flush()
        process = subprocess.Popen(
            step.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the whole group: a step may have started processes of its own
            process.wait()
            code = None
    seconds = time.perf_counter() - start
    if code is None:
        status = f"timeout ({limit_s:.0f} s)"
    elif code != 0 and not step.tolerated_exit(code, out):
        status = f"failed (exit {code})"
    else:
        absent = [name for name in step.artefacts if not (out / name).exists()]
        status = f"failed (missing {', '.join(absent)})" if absent else "ok"
    try:
        figure = step.figure(out) if status == "ok" or step.figure_on_failure else ""
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        figure, status = "", f"failed (unreadable result: {type(error).__name__}: {error})"
    row = {"step": step.name, "status": status, "seconds": round(seconds, 1), "figure": figure, "log": log.name}
    if status != "ok":
        row["log_tail"] = tail(log)
    return row


def install_wheels(folder: str, target: str) -> None:
    """Install every wheel of ``folder`` into ``target`` without the network (a GPU image that lacks LightningCLI's
    jsonargparse, say), and put ``target`` first on this process's path."""
    wheels = sorted(str(path) for path in Path(folder).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: --wheels {folder}: no .whl files there")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", target]
    subprocess.run(pip + wheels, check=True)
    sys.path.insert(0, target)


def environment(cpu: bool, wheels: str | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([wheels] if wheels else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # no network on the GPU machine: the hub is never asked, and W&B (where installed) stays offline
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg")
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: one thread each is fastest on a shared CPU
    return env


def header(cpu: bool, command: str) -> dict[str, str]:
    import torch

    device = "cpu (--cpu)" if cpu else torch.cuda.get_device_name(0)
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "command": command,
        "missing": ", ".join(missing_modules()) or "none",
        "commit": _commit(),
    }


def _commit() -> str:
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return found.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def table(info: dict[str, str], rows: list[dict]) -> str:
    lines = [f"{key}: {value}" for key, value in info.items()]
    lines += ["", "| step | status | seconds | key figure |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['figure']} |" for r in rows]
    for row in rows:
        if row.get("log_tail"):
            lines += ["", f"{row['step']}: last lines of {row['log']}", "```", *row["log_tail"], "```"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu-check-out", help="output folder")
    parser.add_argument("--cpu", action="store_true", help="the same steps at tiny sizes on the CPU")
    parser.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    parser.add_argument(
        "--wheels", default=None, help="a folder of wheels the machine lacks, installed (offline) for this run only"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 570; --cpu 240)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "scripts/gpu_check.sh " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        print(f"gpu_check: {sys.executable} cannot import torch; set PYTHON to one that can", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); --cpu runs the rehearsal", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-site-") as site:
        if args.wheels:
            install_wheels(args.wheels, site)
        env = environment(args.cpu, site if args.wheels else None)
        return run_all(args, out, command, env, torch.cuda.is_available())


def run_all(args: argparse.Namespace, out: Path, command: str, env: dict[str, str], cuda: bool) -> int:
    """Every step in turn, then the summary; the exit code is 0 when every step is ok or a documented skip."""
    info = header(args.cpu, command)
    print("\n".join(f"{key}: {value}" for key, value in info.items()), flush=True)
    budget = args.budget or (CPU_BUDGET_S if args.cpu else BUDGET_S)
    only = set(args.only.split(",")) if args.only else None
    began, rows = time.perf_counter(), []
    for step in plan(ROOT, out, args.cpu, sys.executable, cuda):
        if only is not None and step.name not in only:
            continue
        left = budget - (time.perf_counter() - began)
        row = {"step": step.name, "seconds": 0.0, "figure": "", "log": ""}
        if step.skip:
            row["status"] = step.skip
        elif step.min_left_s and left < step.min_left_s:
            row["status"] = f"{SKIPPED_OPTIONAL}: {left:.0f} s of {budget:.0f} s left"
        elif left < 1:
            row["status"] = "out of time"
        else:
            row = run_step(step, out, env, min(step.limit_s, left))
        for entry in step.expand(row, out):
            rows.append(entry)
            print(f"{entry['step']}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
    info["total_seconds"] = f"{time.perf_counter() - began:.1f}"
    text = table(info, rows)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({**info, "steps": rows}, indent=1))
    print("\n" + text)
    archive(out)
    return 0 if all(r["status"] in GOOD or r["status"].startswith(SKIPPED_OPTIONAL) for r in rows) else 1


def archive(out: Path) -> None:
    """Everything in the folder as one ``gpu-check.tar.gz``, to copy off the machine in one piece."""
    path = out / ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(out.iterdir()):
            if item.name != ARCHIVE:
                tar.add(item, arcname=f"{out.name}/{item.name}")


if __name__ == "__main__":
    sys.exit(main())
