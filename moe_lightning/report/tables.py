"""Final values per run, the results table (mean ± std over seeds), the claims table and its decision rule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moe_lightning.geometry.probe import PCA_SITES
from moe_lightning.report.runs import Run, final_value, last_probe_step, layer_names

# (metric key below geometry/<layer>/, column title). "/mean" keys are means over the layer's experts.
GEOMETRY_METRICS: list[tuple[str, str]] = [
    ("jac_sigma_max/mean", "σ_max (expert mean)"),
    ("jac_decay_slope/mean", "decay slope α (expert mean)"),
    ("jac_effective_rank/mean", "Jacobian eff. rank (expert mean)"),
    ("layer_jac_sigma_max", "layer σ_max"),
    ("layer_jac_decay_slope", "layer decay slope α"),
    ("pca_input_effective_rank/mean", "PCA eff. rank, input"),
    ("pca_hidden_effective_rank/mean", "PCA eff. rank, hidden"),
    ("pca_output_effective_rank/mean", "PCA eff. rank, output"),
    ("align_mean_offdiag", "alignment A, off-diag mean"),
    ("align_ratio", "A / chance"),
    ("palign_mean_offdiag", "pointwise alignment P, off-diag mean"),
    ("subspace_rep_overlap", "rep. subspace overlap"),
    ("subspace_fun_overlap", "fun. subspace overlap"),
    ("subspace_overlap_chance", "overlap chance r/d"),
]
# Run-level keys (no layer): their last logged value.
RUN_METRICS: list[tuple[str, str]] = [("val/loss", "final val loss"), ("train/loss", "final train loss")]
LAYER_MODES = ("mean", "each")
MEAN_LAYER = "mean"

DECISION_RULE = (
    'Decision rule. For a claim "A < B" (or "A > B") the runs of A and B are paired by seed (only seeds present in '
    "both) and d_s = A_s − B_s. The claim holds if every d_s has the claimed sign AND |mean d| > max(std_A, std_B) "
    "over those seeds (sample std, ddof=1; at least 2 paired seeds are needed). It does not hold if every d_s has "
    "the opposite sign and |mean d| > that std. Otherwise it is inconclusive (also when there are fewer than 2 "
    "paired seeds or any value is NaN). Threshold claims (C3): holds if the value is below the threshold in every "
    "seed, does not hold if it is above the threshold in every seed, else inconclusive (also, as for paired claims, "
    "with fewer than 2 seeds or any NaN)."
)
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def seed_values(runs: list[Run], layer_mode: str = "mean") -> pd.DataFrame:
    """Each finished run's final value of every metric.

    The final value of a geometry metric is its value at the layer's last probe step; with ``layer_mode="mean"``
    it is then averaged over the run's layers (NaN layers left out; NaN when every layer is NaN). Run-level
    metrics (``val/loss``, ``train/loss``) take their last logged value.

    Args:
        runs: runs from :func:`~moe_lightning.report.runs.discover_runs`; only ``run.ok`` runs are used.
        layer_mode: ``"mean"`` (one row per run, ``layer="mean"``) or ``"each"`` (one row per run and layer).

    Returns:
        Long table with columns ``family, routing, seed, layer, metric, value, path``.
    """
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode={layer_mode!r} is not supported; allowed values: {', '.join(LAYER_MODES)}")
    rows = []
    for run in runs:
        if not run.ok:
            continue
        history = run.history
        per_layer: dict[str, dict[str, float]] = {}
        for layer in layer_names(history):
            step = last_probe_step(history, layer)
            per_layer[layer] = {
                key: final_value(history, f"geometry/{layer}/{key}", step) for key, _ in GEOMETRY_METRICS
            }
        run_level = {key: final_value(history, key) for key, _ in RUN_METRICS}
        base = {"family": run.family or "", "routing": run.routing, "seed": run.seed, "path": run.path}
        if layer_mode == "mean":
            for key, _ in GEOMETRY_METRICS:
                values = [v[key] for v in per_layer.values() if math.isfinite(v[key])]
                rows.append(
                    {
                        **base,
                        "layer": MEAN_LAYER,
                        "metric": key,
                        "value": float(np.mean(values)) if values else math.nan,
                    }
                )
        else:
            for layer, values in per_layer.items():
                rows.extend(
                    {**base, "layer": layer, "metric": key, "value": values[key]} for key, _ in GEOMETRY_METRICS
                )
        layers = [MEAN_LAYER] if layer_mode == "mean" else list(per_layer) or [MEAN_LAYER]
        for layer in layers:
            rows.extend({**base, "layer": layer, "metric": key, "value": value} for key, value in run_level.items())
    return pd.DataFrame(rows, columns=["family", "routing", "seed", "layer", "metric", "value", "path"])


def _routing_order(routing: str) -> int:
    order = ("dense", "topk", "soft")
    return order.index(routing) if routing in order else len(order)


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1), n)`` over the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n >= 2 else math.nan
    return mean, std, n


def results_table(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n over seeds of every metric, one row per (family, routing, layer).

    Args:
        values: the output of :func:`seed_values`.

    Returns:
        Columns ``family, routing, layer, n_seeds, seeds`` and, for every metric key ``k``, ``k:mean``, ``k:std``,
        ``k:n`` (n counts the seeds with a finite value).
    """
    metrics = [key for key, _ in GEOMETRY_METRICS + RUN_METRICS]
    out = []
    if values.empty:
        return pd.DataFrame(columns=["family", "routing", "layer", "n_seeds", "seeds"])
    for (family, routing, layer), group in values.groupby(["family", "routing", "layer"], sort=False):
        seeds = sorted({int(s) for s in group["seed"].dropna()})
        row: dict[str, object] = {
            "family": family,
            "routing": routing,
            "layer": layer,
            "n_seeds": int(group["path"].nunique()),
            "seeds": " ".join(str(s) for s in seeds),
        }
        for key in metrics:
            mean, std, n = summarize(group.loc[group["metric"] == key, "value"].tolist())
            row[f"{key}:mean"], row[f"{key}:std"], row[f"{key}:n"] = mean, std, n
        out.append(row)
    table = pd.DataFrame(out)
    layer_rank = {layer: i for i, layer in enumerate(dict.fromkeys(values["layer"]))}
    table["_order"] = [
        (f, _routing_order(r), layer_rank[la])
        for f, r, la in zip(table.family, table.routing, table.layer, strict=True)
    ]
    return table.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def format_number(value: float) -> str:
    """Four significant digits; ``n/a`` for NaN."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def format_mean_std(mean: float, std: float, n: int) -> str:
    """``"mean ± std"`` (``"mean"`` alone for one seed, ``n/a`` for none)."""
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    if n < 2 or not math.isfinite(std):
        return format_number(mean)
    return f"{format_number(mean)} ± {format_number(std)}"


def results_display(table: pd.DataFrame) -> pd.DataFrame:
    """The results table for people: one ``mean ± std`` column per metric, plus routing, layer and seeds."""
    display = pd.DataFrame()
    if len(set(table.get("family", []))) > 1:
        display["family"] = table["family"]
    display["routing"] = table["routing"]
    if set(table.get("layer", [])) != {MEAN_LAYER}:
        display["layer"] = table["layer"]
    display["n seeds"] = table["n_seeds"]
    for key, title in GEOMETRY_METRICS + RUN_METRICS:
        if f"{key}:mean" not in table or not table[f"{key}:n"].any():
            continue  # a metric no run logged (e.g. val/loss without validation)
        display[f"{title} [{key}]"] = [
            format_mean_std(m, s, n)
            for m, s, n in zip(table[f"{key}:mean"], table[f"{key}:std"], table[f"{key}:n"], strict=True)
        ]
    return display


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a small frame (every cell as text, ``|`` escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---------------------------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide` or :func:`decide_threshold`.

    Attributes:
        verdict: ``"holds"``, ``"does not hold"`` or ``"inconclusive"``.
        seeds: the seeds used (paired seeds for :func:`decide`).
        mean_difference: mean of ``d_s = A_s − B_s`` (or of ``value − threshold``).
        std_a, std_b: sample std of A and B over those seeds (``std_b`` NaN for threshold claims).
        reason: why the verdict is inconclusive, empty otherwise.
    """

    verdict: str
    seeds: tuple[int, ...]
    mean_difference: float
    std_a: float
    std_b: float
    reason: str = ""


def decide(a: Mapping[int, float], b: Mapping[int, float], relation: str) -> Decision:
    """Apply the paired decision rule (:data:`DECISION_RULE`) to the claim ``A <relation> B``.

    Args:
        a: seed -> final value of A.
        b: seed -> final value of B.
        relation: ``"<"`` or ``">"``.

    Returns:
        The :class:`Decision`.

    Example:
        >>> decide({0: 1.0, 1: 1.1}, {0: 2.0, 1: 2.2}, "<").verdict
        'holds'
    """
    if relation not in ("<", ">"):
        raise ValueError(f"relation={relation!r} is not supported; allowed values: '<', '>'")
    seeds = tuple(sorted(set(a) & set(b)))
    a_s = np.asarray([a[s] for s in seeds], dtype=float)
    b_s = np.asarray([b[s] for s in seeds], dtype=float)
    d = a_s - b_s
    mean_d = float(d.mean()) if len(seeds) else math.nan
    std_a = float(a_s.std(ddof=1)) if len(seeds) >= 2 else math.nan
    std_b = float(b_s.std(ddof=1)) if len(seeds) >= 2 else math.nan
    if len(seeds) < 2:
        return Decision(INCONCLUSIVE, seeds, mean_d, std_a, std_b, f"{len(seeds)} paired seed(s), need 2")
    if not (np.isfinite(a_s).all() and np.isfinite(b_s).all()):
        return Decision(INCONCLUSIVE, seeds, mean_d, std_a, std_b, "a value is NaN")
    sign = -1.0 if relation == "<" else 1.0
    large = abs(mean_d) > max(std_a, std_b)
    if (np.sign(d) == sign).all() and large:
        return Decision(HOLDS, seeds, mean_d, std_a, std_b)
    if (np.sign(d) == -sign).all() and large:
        return Decision(DOES_NOT_HOLD, seeds, mean_d, std_a, std_b)
    reason = "mixed signs" if not ((np.sign(d) == sign).all() or (np.sign(d) == -sign).all()) else "|mean d| <= std"
    return Decision(INCONCLUSIVE, seeds, mean_d, std_a, std_b, reason)


def decide_threshold(values: Mapping[int, float], threshold: float) -> Decision:
    """Apply the threshold rule: the claim "value < threshold" (:data:`DECISION_RULE`, C3).

    Args:
        values: seed -> final value.
        threshold: the absolute threshold.

    Returns:
        The :class:`Decision` (``mean_difference`` is the mean of ``value − threshold``).
    """
    seeds = tuple(sorted(values))
    v = np.asarray([values[s] for s in seeds], dtype=float)
    mean_d = float((v - threshold).mean()) if len(seeds) else math.nan
    std = float(v.std(ddof=1)) if len(seeds) >= 2 else math.nan
    if len(seeds) < 2:
        return Decision(INCONCLUSIVE, seeds, mean_d, std, math.nan, f"{len(seeds)} seed(s), need 2")
    if not np.isfinite(v).all():
        return Decision(INCONCLUSIVE, seeds, mean_d, std, math.nan, "a value is NaN")
    if (v < threshold).all():
        return Decision(HOLDS, seeds, mean_d, std, math.nan)
    if (v > threshold).all():
        return Decision(DOES_NOT_HOLD, seeds, mean_d, std, math.nan)
    return Decision(INCONCLUSIVE, seeds, mean_d, std, math.nan, "seeds on both sides of the threshold")


@dataclass(frozen=True)
class Claim:
    """One directional claim of the papers (see docs/geometry.md): ``A <relation> B`` on ``metric``, or
    ``A < threshold``."""

    claim: str
    statement: str
    metric: str
    a: str
    relation: str
    b: str | None  # None: threshold claim


def paper_claims() -> list[Claim]:
    """C1a, C1b, C2, C3 and C4 as rows (MoE = top-k and soft, each against dense)."""
    claims: list[Claim] = []
    for moe in ("topk", "soft"):
        claims.append(
            Claim("C1a", "MoE is flatter: lower expert σ_max than dense", "jac_sigma_max/mean", moe, "<", "dense")
        )
    for moe in ("topk", "soft"):
        claims.append(
            Claim(
                "C1a (control)", "the whole layer map is flatter than dense", "layer_jac_sigma_max", moe, "<", "dense"
            )
        )
    for moe in ("topk", "soft"):
        claims.append(Claim("C1b", "faster spectral decay than dense", "jac_decay_slope/mean", moe, ">", "dense"))
    for site in PCA_SITES:
        for moe in ("topk", "soft"):
            claims.append(
                Claim(
                    "C2",
                    f"expert-local representations have higher effective rank than dense ({site} site)",
                    f"pca_{site}_effective_rank/mean",
                    moe,
                    ">",
                    "dense",
                )
            )
    for moe in ("topk", "soft"):
        claims.append(Claim("C3", "expert Jacobians barely align", "align_mean_offdiag", moe, "<", None))
    claims.append(Claim("C4", "top-k is sharper than soft", "jac_sigma_max/mean", "topk", ">", "soft"))
    claims.append(
        Claim("C4", "top-k is lower-rank than soft (Jacobian)", "jac_effective_rank/mean", "topk", "<", "soft")
    )
    claims.append(
        Claim("C4", "top-k is lower-rank than soft (hidden PCA)", "pca_hidden_effective_rank/mean", "topk", "<", "soft")
    )
    return claims


def _by_seed(values: pd.DataFrame, routing: str, metric: str) -> dict[int, float]:
    rows = values[(values["routing"] == routing) & (values["metric"] == metric) & values["seed"].notna()]
    return {int(s): float(v) for s, v in zip(rows["seed"], rows["value"], strict=True)}


def claims_table(values: pd.DataFrame, threshold: float = 0.1) -> pd.DataFrame:
    """Evaluate :func:`paper_claims` on per-seed final values.

    Args:
        values: the output of :func:`seed_values` (one family; per layer rows when ``layer_mode="each"``).
        threshold: the absolute threshold of C3 on ``align_mean_offdiag``.

    Returns:
        Columns ``family, layer, claim, statement, metric, comparison, A, B, mean difference, n seeds, verdict,
        note`` (A and B as ``mean ± std`` over the seeds used) plus raw ``mean_difference`` and ``n``.
    """
    rows = []
    if values.empty:
        return pd.DataFrame(rows)
    for (family, layer), group in values.groupby(["family", "layer"], sort=False):
        for claim in paper_claims():
            a = _by_seed(group, claim.a, claim.metric)
            if claim.b is None:
                decision = decide_threshold(a, threshold)
                ratio = _by_seed(group, claim.a, "align_ratio")
                used = [s for s in decision.seeds]
                ratio_mean, ratio_std, ratio_n = summarize([ratio.get(s, math.nan) for s in used])
                comparison = f"{claim.a} {claim.metric} < {threshold:g}"
                b_text = f"threshold {threshold:g}"
                note = f"ratio to chance: {format_mean_std(ratio_mean, ratio_std, ratio_n)}"
            else:
                b = _by_seed(group, claim.b, claim.metric)
                decision = decide(a, b, claim.relation)
                used = list(decision.seeds)
                comparison = f"{claim.a} {claim.relation} {claim.b}"
                b_text = format_mean_std(*summarize([b[s] for s in used]))
                note = ""
            a_text = format_mean_std(*summarize([a[s] for s in used]))
            if decision.reason:
                note = f"{note}; {decision.reason}" if note else decision.reason
            rows.append(
                {
                    "family": family,
                    "layer": layer,
                    "claim": claim.claim,
                    "statement": claim.statement,
                    "metric": claim.metric,
                    "comparison": comparison,
                    "A": a_text,
                    "B": b_text,
                    "mean difference": format_number(decision.mean_difference),
                    "n seeds": len(decision.seeds),
                    "verdict": decision.verdict,
                    "note": note,
                    "mean_difference": decision.mean_difference,
                    "seeds": " ".join(str(s) for s in decision.seeds),
                }
            )
    return pd.DataFrame(rows)


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """The claims table for people (no raw columns; family and layer only when they vary)."""
    if table.empty:
        return table
    columns = ["claim", "statement", "metric", "comparison", "A", "B", "mean difference", "n seeds", "verdict", "note"]
    if len(set(table["layer"])) > 1:
        columns.insert(0, "layer")
    if len(set(table["family"])) > 1:
        columns.insert(0, "family")
    return table[columns]
