"""The steps of the GPU run (scripts/gpu_check.py): each one's command on CUDA and in the CPU rehearsal, its time
limit, the files it must leave in the output folder and the key figure read back from them."""

from __future__ import annotations

import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SKIPPED_NO_CUDA = "skipped: no CUDA"
SKIPPED_OPTIONAL = "skipped (optional)"
# The CLI commands (fits, sweep) need LightningCLI's parser, which an image of torch and Lightning alone may lack.
CLI_MODULES = ("jsonargparse", "docstring_parser", "typeshed_client")


@dataclass
class Step:
    """One step of the run."""

    name: str
    command: list[str] = field(default_factory=list)
    limit_s: float = 60.0
    artefacts: tuple[str, ...] = ()
    figure: Callable[[Path], str] = lambda out: ""
    figure_on_failure: bool = False
    skip: str | None = None
    min_left_s: float = 0.0
    expand: Callable[[dict, Path], list[dict]] = lambda row, out: [row]

    def tolerated_exit(self, code: int, out: Path) -> bool:
        """A non-zero exit that the step's own rows account for (the fits: one row per config)."""
        return self.name == "fits" and (out / "fits.json").exists()


def installed(name: str) -> bool:
    """Whether ``import name`` would find the module (looked up, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def needs(modules: tuple[str, ...]) -> str | None:
    missing = [name for name in modules if not installed(name)]
    return f"skipped: needs {', '.join(missing)} (--wheels)" if missing else None


# ------------------------------------------------------------------------------------------------- key figures


def tests_figure(out: Path) -> str:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    count = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"


def fit_rows(row: dict, out: Path) -> list[dict]:
    """One row per config from ``fits.json`` (written after each fit), the configs it lacks marked not run."""
    path = out / "fits" / "fits.json"
    if not path.exists():
        return [row]
    rows = []
    for fit in json.loads(path.read_text()):
        keys = fit.get("keys", {})
        figure = ""
        if fit.get("last_loss") is not None:
            figure = f"loss {fit['last_loss']:.3f} after {fit['steps_logged'] - 1} steps; keys " + " / ".join(
                f"{name} {count}" for name, count in keys.items()
            )
        entry = {"step": f"fit {fit['config']}", "status": fit["status"], "seconds": round(fit["seconds"], 1)}
        entry.update(figure=figure, log=f"fits/{fit['name']}.log")
        if fit.get("log_tail"):
            entry["log_tail"] = fit["log_tail"]
        rows.append(entry)
    if row["status"].startswith("timeout"):
        rows.append({**row, "step": "fits (the rest)"})
    return rows


def observation_figure(out: Path) -> str:
    cases = json.loads((out / "observation.json").read_text())
    same = [c["case"] for c in cases if c["status"] == "ok"]
    other = [f"{c['case']}: {c['status']}" for c in cases if c["status"] != "ok"]
    return f"{len(same)}/{len(cases)} identical weights with and without the monitors" + (
        "; " + "; ".join(other) if other else ""
    )


def moe_figure(out: Path) -> str:
    """Our best dispatch against HF ``grouped_mm`` and the dense FFN, at the largest token count measured."""
    report = json.loads((out / "benchmark_moe.json").read_text())
    timed = [r for r in report["results"] if r["tokens_per_s"]]
    tokens = max(r["tokens"] for r in timed)
    parts = []
    for ratio in (q for q in report["ratios"] if q["tokens"] == tokens):
        cell = {
            r["impl"]: r["tokens_per_s"]
            for r in timed
            if (r["tokens"], r["num_experts"]) == (tokens, ratio["num_experts"])
        }
        grouped = cell.get("hf_grouped_mm")
        versus = f"{ratio['best_ours_tokens_per_s'] / grouped:.2f}x HF grouped_mm" if grouped else "no HF grouped_mm"
        shape = f"E={ratio['num_experts']} k={ratio['top_k']}"
        parts.append(f"{shape}: {ratio['best_ours']} {versus}, {ratio['vs_dense']:.2f}x dense")
    return f"N={tokens} " + "; ".join(parts)


def callbacks_figure(out: Path) -> str:
    report = json.loads((out / "benchmark_callbacks.json").read_text())
    router, geometry = report["router"], report["geometry"]
    return (
        f"step {report['baseline_step_ms']:.1f} ms; steady state: router {router['steady_state'] * 100:.2f}%, "
        f"geometry {geometry['steady_state'] * 100:.2f}% (probe every {geometry['every_n_steps']} steps)"
    )


def sweep_figure(out: Path) -> str:
    log = (out / "sweep.log").read_text()
    done = re.findall(r"\[sweep\] (\d+/\d+) jobs done", log)
    if done:
        return f"{done[-1]} jobs done"
    planned = [line for line in log.splitlines() if re.match(r"^[\w.-]+-seed\d+: ", line)]
    return f"dry run: {len(planned)} jobs planned"


# ------------------------------------------------------------------------------------------------------- the plan


def probe_benchmark(root: Path) -> Path | None:
    """The real-scale probe benchmark script, where one exists."""
    found = sorted((root / "scripts").glob("benchmark_*probe*.py"))
    return found[0] if found else None


def probe_step(root: Path, out: Path, cpu: bool, python: str) -> Step:
    """Its options are taken from its source: ``--device``, ``--out`` or ``--json``, and ``--quick`` for --cpu."""
    script = probe_benchmark(root)
    if script is None:
        return Step("benchmark-probe", skip="absent")
    source = script.read_text()
    command = [python, str(script)]
    if '"--device"' in source:
        command += ["--device", "cpu" if cpu else "cuda"]
    if cpu and '"--quick"' in source:
        command.append("--quick")
    artefacts: tuple[str, ...] = ()
    for option in ("--out", "--json"):
        if f'"{option}"' in source:
            command += [option, str(out / "benchmark_probe.json")]
            artefacts = ("benchmark_probe.json",)
            break
    return Step("benchmark-probe", command, limit_s=60 if cpu else 120, artefacts=artefacts)


# The options that size each step: on CUDA, what the check is for; under --cpu, the smallest the scripts take.
ON_CUDA = {
    "fits": ["--trainer", "gpu", "--steps", "6"],
    "observation": ["--device", "cuda"],
    "benchmark-moe": ["--device", "cuda", "--time-limit", "100"],
    "benchmark-callbacks": ["--device", "cuda", "--steps", "200", "--repeats", "2"],
    "sweep": ["--devices", "1", "--", "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed"],
}
ON_CPU = {
    "fits": ["--trainer", "cpu", "--steps", "2", "--tiny"],
    "observation": ["--device", "cpu", "--tiny", "--precision", "bf16-mixed"],
    "benchmark-moe": ["--device", "cpu", "--tokens", "64", "--dim", "16", "--hidden", "32", "--repeats", "1"]
    + ["--time-limit", "20"],
    "benchmark-callbacks": ["--steps", "3", "--repeats", "1", "--block-size", "32", "--batch-size", "4"]
    + ["--probe-tokens", "16"],
    "sweep": ["--dry-run"],
}


def commands(root: Path, out: Path, cpu: bool, python: str) -> dict[str, list[str]]:
    """Each step's command line."""
    scripts = root / "scripts"
    sizes = ON_CPU if cpu else ON_CUDA
    base = {
        "gpu-tests": [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:randomly"]
        + ["-p", "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}"],
        "fits": [python, str(scripts / "gpu_check_fits.py"), str(out / "fits"), "--summary=false"],
        "observation": [python, str(scripts / "gpu_check_observation.py"), str(out)],
        "benchmark-moe": [python, str(scripts / "benchmark_moe.py"), "--out", str(out / "benchmark_moe.json")],
        "benchmark-callbacks": [python, str(scripts / "benchmark_callbacks.py")]
        + ["--out", str(out / "benchmark_callbacks.json")],
        "sweep": [python, "-m", "moe_lightning.commands", "sweep", "transformer_small", "--out", str(out / "sweep")]
        + ["--seeds", "0", "--loggers", "csv", "--no-report"],
    }
    return {name: command + sizes.get(name, []) for name, command in base.items()}


def plan(root: Path, out: Path, cpu: bool, python: str, cuda: bool) -> list[Step]:
    """Every step, in the order they run, with its time limit (on CUDA; under ``--cpu``) and what it leaves. The GPU
    tests run wherever ``cuda`` is true, under ``--cpu`` too: only without CUDA would every one of them skip."""
    command = commands(root, out, cpu, python)

    def limit(gpu_s: float, cpu_s: float = 60.0) -> float:
        return cpu_s if cpu else gpu_s

    return [
        Step(
            "gpu-tests",
            command["gpu-tests"],
            limit(120),
            ("gpu_tests.xml",),
            tests_figure,
            figure_on_failure=True,
            skip=None if cuda else SKIPPED_NO_CUDA,
        ),
        Step("fits", command["fits"], limit(200, 90), ("fits/fits.json",), skip=needs(CLI_MODULES), expand=fit_rows),
        Step(
            "observation",
            command["observation"],
            limit(120),
            ("observation.json",),
            observation_figure,
            figure_on_failure=True,
        ),
        Step("benchmark-moe", command["benchmark-moe"], limit(150), ("benchmark_moe.json",), moe_figure),
        Step(
            "benchmark-callbacks",
            command["benchmark-callbacks"],
            limit(150),
            ("benchmark_callbacks.json",),
            callbacks_figure,
        ),
        probe_step(root, out, cpu, python),
        # optional: on the GPU only with 2.5 minutes left (4 jobs of 100 steps); --cpu only plans the jobs
        Step(
            "sweep",
            command["sweep"],
            limit(300),
            (),
            sweep_figure,
            skip=needs(CLI_MODULES),
            min_left_s=0 if cpu else 150,
        ),
    ]
