"""Training runs read back and their statistics: finding and loading runs (CSV, TensorBoard, W&B logs and sweep
jobs), each seed's values at every probe step, the results table, the papers' claims as data with the one loop that
decides them (t-interval over seeds, bootstrap interval over probe tokens, effect size), a run's quantities over
training, and the expert means of a probed layer. Pure data: no Lightning, no plotting; the report draws these
(:mod:`moe_lightning.report`). This package only re-exports the public names of its modules.

The names load on first use, so ``moe-lightning report --help`` reads the option values
(:mod:`moe_lightning.analysis.choices`) without pandas.

Python::

    from moe_lightning.analysis import claims_over_training, discover_runs, evaluate_claims, step_values
    runs = discover_runs(["runs/sweep-mlp"])
    over_training = claims_over_training(step_values(runs))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.analysis.claims import (
        PAPER_CLAIMS,
        Claim,
        Evaluation,
        claims_over_training,
        evaluate_claims,
        paper_claims,
    )
    from moe_lightning.analysis.decision import DECISION_RULE, Decision, decide, decide_threshold
    from moe_lightning.analysis.discover import discover_runs
    from moe_lightning.analysis.experts import expert_mean_pca, expert_mean_spectrum, layer_metrics
    from moe_lightning.analysis.intervals import Interval, effect_size, percentile_interval, t_interval, t_quantile
    from moe_lightning.analysis.results import results_table, seed_values, summarize
    from moe_lightning.analysis.run import Run
    from moe_lightning.analysis.steps import step_values
    from moe_lightning.analysis.timeline import (
        Quantity,
        SpectrumEvolution,
        layer_quantities,
        router_load,
        saved_reports,
        spectrum_evolution,
    )

# Public name -> the module that defines it.
_SOURCES = {
    "Claim": "claims",
    "DECISION_RULE": "decision",
    "Decision": "decision",
    "Evaluation": "claims",
    "Interval": "intervals",
    "PAPER_CLAIMS": "claims",
    "Quantity": "timeline",
    "Run": "run",
    "SpectrumEvolution": "timeline",
    "claims_over_training": "claims",
    "decide": "decision",
    "decide_threshold": "decision",
    "discover_runs": "discover",
    "effect_size": "intervals",
    "evaluate_claims": "claims",
    "expert_mean_pca": "experts",
    "expert_mean_spectrum": "experts",
    "layer_metrics": "experts",
    "layer_quantities": "timeline",
    "paper_claims": "claims",
    "percentile_interval": "intervals",
    "results_table": "results",
    "router_load": "timeline",
    "saved_reports": "timeline",
    "seed_values": "results",
    "spectrum_evolution": "timeline",
    "step_values": "steps",
    "summarize": "results",
    "t_interval": "intervals",
    "t_quantile": "intervals",
}

__all__ = [
    "Claim",
    "DECISION_RULE",
    "Decision",
    "Evaluation",
    "Interval",
    "PAPER_CLAIMS",
    "Quantity",
    "Run",
    "SpectrumEvolution",
    "claims_over_training",
    "decide",
    "decide_threshold",
    "discover_runs",
    "effect_size",
    "evaluate_claims",
    "expert_mean_pca",
    "expert_mean_spectrum",
    "layer_metrics",
    "layer_quantities",
    "paper_claims",
    "percentile_interval",
    "results_table",
    "router_load",
    "saved_reports",
    "seed_values",
    "spectrum_evolution",
    "step_values",
    "summarize",
    "t_interval",
    "t_quantile",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
