"""Numbers and tables as text: significant digits, ``mean ± std``, intervals, and GitHub-flavoured Markdown."""

from __future__ import annotations

import math

import pandas as pd


def format_level(level: float) -> str:
    """A coverage level as a percentage, ``0.9 -> "90%"``; ``:g`` keeps 97.5% from rounding to 98%."""
    return f"{level * 100:g}%"


def format_number(value: float) -> str:
    """Four significant digits; ``n/a`` for NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4g}"


def format_mean_std(mean: float, std: float, n: int) -> str:
    """``"mean ± std"`` (``"mean"`` alone for one seed, ``n/a`` for none)."""
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    if n < 2 or not math.isfinite(std):
        return format_number(mean)
    return f"{format_number(mean)} ± {format_number(std)}"


def format_interval(low: float, high: float) -> str:
    """``"[low, high]"``; ``n/a`` when either end is undefined."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{format_number(low)}, {format_number(high)}]"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a small frame (every cell as text, ``|`` escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
