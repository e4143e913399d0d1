"""What a pretrained-model probe writes: ``probe.json`` (the reports and the options they were made with) and the
rendered report next to it."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from moe_lightning.commands.probe.options import ProbeOptions
from moe_lightning.common import dtype_name
from moe_lightning.geometry import GeometryReport

# Options that say where the output goes or what it is called, not how the probe ran.
_NOT_RUN_CONFIG = ("tokenizer", "out_dir", "title", "offload_folder")


def default_out_dir(model: str) -> str:
    """``probe-<basename>``: ``probe-Mixtral-8x7B-v0.1`` for ``mistralai/Mixtral-8x7B-v0.1`` or a local directory."""
    base = Path(os.fspath(model).rstrip("/\\")).name or "model"
    return f"probe-{base}"


def run_config(options: ProbeOptions, *, text: str | None, tokenizer: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """The ``config`` of ``probe.json``: the text file, the tokenizer's name and every option that shapes the
    result, with the device and dtype the model actually ran on."""
    config: dict[str, Any] = {"text": text, "tokenizer": getattr(tokenizer, "name_or_path", None)}
    for f in fields(ProbeOptions):
        if f.name not in _NOT_RUN_CONFIG:
            config[f.name] = getattr(options, f.name)
    config.update(layers=options.layer_patterns, device=str(device), dtype=dtype_name(dtype))
    return config


def write_outputs(
    reports: dict[str, GeometryReport],
    out_dir: str | os.PathLike,
    *,
    model: str,
    model_type: str,
    tokens: int,
    config: dict[str, Any],
    title: str,
    peak_memory: dict[str, Any] | None = None,
    weights: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Write ``probe.json`` and the rendered report (tables, plots, index.html) into ``out_dir``.

    ``peak_memory`` (:func:`~moe_lightning.commands.probe.offload.peak_memory`) is written as ``probe.json``'s
    ``"peak_memory"``: ``{"bytes", "measure", "devices"}``. ``"alignment_and_subspaces"`` holds, for each layer of
    more than one expert, the second paper's outputs read from its report
    (:func:`~moe_lightning.analysis.experts.alignment_and_subspaces`): the alignment matrix against chance and the
    functional and representational subspace overlaps side by side, the same numbers the page shows. ``weights``,
    the data-free weight spectra of each layer's experts
    (:meth:`~moe_lightning.geometry.weight_spectra.WeightSpectra.to_dict`), go under ``"weights"`` when given.

    Returns:
        The written paths, ``probe.json`` first.
    """
    # The plotting stack (pandas, matplotlib) loads only when a report is written, not for probe_pretrained alone.
    from moe_lightning.analysis.experts import alignment_and_subspaces
    from moe_lightning.report import render_probe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model,
        "model_type": model_type,
        "tokens": tokens,
        "config": config,
        "peak_memory": peak_memory,
        "alignment_and_subspaces": {
            name: found for name, report in reports.items() if (found := alignment_and_subspaces(report)) is not None
        },
        "layers": {name: report.to_dict() for name, report in reports.items()},
    }
    if weights is not None:
        payload["weights"] = weights
    json_path = out / "probe.json"
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return [str(json_path), *render_probe(reports, str(out), title)]
