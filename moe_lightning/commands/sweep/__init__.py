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

Jobs whose ``run.json`` says ``done`` are skipped, so re-running the same command goes on with a sweep. A job that
stopped before its end (failed, or killed) with a ``checkpoints/last.ckpt`` is continued from it with ``--resume``
(``moe-lightning fit --config <job>/config.yaml --ckpt_path last``: one run folder, one history, and the final values
of an uninterrupted job); without ``--resume`` the sweep refuses to start, naming each such ``last.ckpt``, so that no
checkpoint is thrown away unasked; a ``last.ckpt`` that cannot be read fails its job, naming the file. A job that
stopped before its first checkpoint starts again from scratch. A job that another sweep process on this host is running
(its ``run.json`` names a live pid) is skipped too, so two sweep processes can share one sweep, e.g. one per CPU
socket or one per ``--routings`` subset. A failed job is reported and the others go on. On CPU jobs
run one after another, or ``--devices N`` side by side with ``cores / N`` torch threads each (``OMP_NUM_THREADS``;
oversubscribed threads slow small CPU jobs several-fold). With GPUs, ``--devices N`` (default: the number of
visible GPUs) runs up to N at once, each on its own GPU through ``CUDA_VISIBLE_DEVICES``.
"""

from moe_lightning.commands.sweep.command import build_parser, main
from moe_lightning.commands.sweep.job import LOGGERS, Job, check_loggers, job_command, job_config, plan_jobs
from moe_lightning.commands.sweep.preset import ARM_ALIASES, ARMS, PRESET_DIR, Preset, available_presets, load_preset
from moe_lightning.commands.sweep.run import STATUS_FILE, job_status, run_sweep

__all__ = [
    "ARMS",
    "ARM_ALIASES",
    "LOGGERS",
    "PRESET_DIR",
    "STATUS_FILE",
    "Job",
    "Preset",
    "available_presets",
    "build_parser",
    "check_loggers",
    "job_command",
    "job_config",
    "job_status",
    "load_preset",
    "main",
    "plan_jobs",
    "run_sweep",
]
