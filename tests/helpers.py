"""Helpers the tests share: tiny random Hugging Face MoE models of each family (no download) and reading what a
CSVLogger wrote, and numpy references two test files share. Fixtures built on them live in ``conftest.py``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

# family -> (transformers config class, model class)
HF_MOE_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


def tiny_hf_model(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """A random ``<family>ForCausalLM`` built from ``config`` alone, with weights drawn after ``manual_seed(seed)``."""
    import transformers

    config_name, model_name = HF_MOE_CLASSES[family]
    hf_config = getattr(transformers, config_name)(**config)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(hf_config)


def read_metrics(log_dir: str | Path) -> list[dict[str, str]]:
    """The rows of the one ``metrics.csv`` under ``log_dir``."""
    (path,) = list(Path(log_dir).rglob("metrics.csv"))
    with open(path) as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of one key in CSVLogger rows."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    """The logged values of one key, in row order."""
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def load_script(path: str | Path):
    """Import a script of ``scripts/`` as a module (registered in ``sys.modules``: dataclasses look it up there)."""
    import importlib.util
    import sys

    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def numpy_health(load: np.ndarray) -> dict[str, float]:
    """Router health by hand: utilisation over the ideal load, dead experts, exp(entropy of the load) / E."""
    util = load * len(load) / load.sum()
    share = load / load.sum()
    entropy = -sum(s * math.log(s) for s in share if s > 0)
    return {
        "utilisation_p50": np.percentile(util, 50),
        "utilisation_p90": np.percentile(util, 90),
        "utilisation_max": util.max(),
        "dead_fraction": float((load == 0).mean()),
        "diversity": math.exp(entropy) / len(load),
    }
