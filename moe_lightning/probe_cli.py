"""``moe-lightning probe``: the geometry of a pretrained Hugging Face MoE checkpoint (Mixtral, Qwen-MoE, OLMoE).

The analysis of the second paper (arXiv 2605.16349) on pretrained models: run the model over a text set, capture
the input of every MoE layer with forward hooks, and call :func:`moe_lightning.geometry.probe` on each layer
(Jacobian spectra, weighted PCA, cross-expert alignment, Grassmann subspaces; docs/geometry.md).

Shape legend: ``B`` blocks per batch, ``T`` block length (``--seq-len``), ``N`` tokens, ``D`` model dim.

Examples:
    moe-lightning probe mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --max-tokens 512 --out probe-mixtral
    moe-lightning probe ./my-olmoe-checkpoint --text notes.txt --layers 'model.layers.1*.mlp'

From Python, on a model that is already loaded::

    reports = probe_pretrained(model, ["some text", "more text"], tokenizer=tokenizer, max_tokens=256)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.adapters import find_moe_layers, registered_adapters
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.common import restored_modes
from moe_lightning.geometry import GeometryReport, ProbeConfig, probe

PROG = "moe-lightning probe"
# Hugging Face ``config.model_type`` -> the adapter in moe_lightning/adapters/hf.py that reads its MoE blocks.
MODEL_TYPE_ADAPTERS: dict[str, str] = {
    "mixtral": "hf-mixtral",
    "qwen2_moe": "hf-qwen2-moe",
    "qwen3_moe": "hf-qwen3-moe",
    "olmoe": "hf-olmoe",
}
MODEL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
PROBE_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TEXT_FILE = "bundled:wikitext-2/test.txt"
# Lines tokenized per tokenizer call while filling the token budget (the text file may be much longer).
_TOKENIZE_CHUNK_LINES = 64


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values whose MoE blocks a registered adapter reads."""
    present = set(registered_adapters())
    return [model_type for model_type, adapter in MODEL_TYPE_ADAPTERS.items() if adapter in present]


def _supported_text() -> str:
    return f"Supported model types: {', '.join(supported_model_types())} (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)"


def _hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (``HF_HUB_OFFLINE``, read now rather than at import time)."""
    import huggingface_hub

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _looks_like_hub_id(name: str) -> bool:
    """True for ``"name"`` or ``"org/name"`` that the hub accepts as a repository id; False for anything that can
    only be a filesystem path (absolute, ``./``, ``~``, several slashes, backslashes)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(model: str | os.PathLike, *, trust_remote_code: bool = False) -> tuple[str, dict[str, Any], bool]:
    """Locate a checkpoint and read its config, without loading any weights.

    A local directory is used as is. Anything else must be a hub repository id; it is looked up in the local
    Hugging Face cache only when offline mode is on (``HF_HUB_OFFLINE=1``) or the hub does not answer within a
    few seconds (these machines have no network), so a missing model fails fast instead of retrying for ~25 s.

    Args:
        model: a local directory or a hub repository id (``"mistralai/Mixtral-8x7B-v0.1"``).
        trust_remote_code: passed to ``transformers``.

    Returns:
        ``(model, config dict, local_files_only)``; the last is what to pass to the later ``from_pretrained`` calls.

    Raises:
        ValueError: the path does not exist, the model could not be fetched, it has no ``config.json``, or its
            ``model_type`` is not one we have an adapter for (the message lists the supported types).
    """
    from transformers import PretrainedConfig

    name = os.fspath(model)
    local = Path(name).expanduser()
    local_files_only = False
    if local.exists():
        if not local.is_dir():
            raise ValueError(
                f"model {name!r} is a file; expected a checkpoint directory or a hub name. {_supported_text()}"
            )
        if not (local / "config.json").is_file():
            raise ValueError(
                f"model directory {name!r} has no config.json, so it is not a Hugging Face checkpoint. "
                f"{_supported_text()}"
            )
        name = str(local)
    elif not _looks_like_hub_id(name):
        raise ValueError(
            f"model path {name!r} does not exist. Give a local checkpoint directory or a hub name. {_supported_text()}"
        )
    else:
        local_files_only = _hub_offline()
        if not local_files_only:
            import huggingface_hub

            from moe_lightning.data.wikitext import hub_reachable

            local_files_only = not hub_reachable(huggingface_hub.constants.ENDPOINT)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(
            name, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        where = (
            "it is not in the local Hugging Face cache and the hub is unreachable or offline mode is on"
            if local_files_only
            else "the Hugging Face Hub refused or failed the request"
        )
        raise ValueError(
            f"model {name!r} does not exist locally and could not be fetched: {where} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Give a local checkpoint directory or a cached "
            f"hub name. {_supported_text()}"
        ) from error
    model_type = config_dict.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(
            f"model {name!r} has model_type={model_type!r}, which has no MoE adapter. {_supported_text()}. "
            "Other MoE layers can be registered with moe_lightning.adapters.register_moe_class and probed with "
            "probe_pretrained(model, ...)."
        )
    return name, config_dict, local_files_only


def _resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; allowed values: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _choice(name: str, value: str, choices: dict[str, torch.dtype]) -> torch.dtype:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(choices)}")
    return choices[value]


def load_pretrained(
    model: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, str]:
    """Load a supported MoE checkpoint and its tokenizer, in eval mode; the model type is checked first.

    Args:
        model: a local directory or a hub name.
        tokenizer: where to load the tokenizer from; None uses ``model``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float64"`` (float64 selects the eager experts kernel, because
            ``grouped_mm`` has no float64 CPU kernel).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        trust_remote_code: passed to ``transformers``.

    Returns:
        ``(model, tokenizer, model_type)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _choice("dtype", dtype, MODEL_DTYPES)
    target = _resolve_device(device)
    name, config_dict, local_files_only = resolve_model(model, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    if torch_dtype == torch.float64:
        kwargs["experts_implementation"] = "eager"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except OSError as error:
        raise ValueError(f"could not load the weights of {name!r}: {error}") from error
    loaded = loaded.to(target).eval()
    tokenizer_name = name if tokenizer is None else os.fspath(tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(
            tokenizer_name, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load a tokenizer from {tokenizer_name!r} ({type(error).__name__}: {error}); "
            "pass --tokenizer with a directory or hub name that has one"
        ) from error
    return loaded, tok, str(config_dict["model_type"])


def read_text_file(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one document or paragraph per line, as in WikiText)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"text file {os.fspath(path)!r} does not exist; pass --text with a UTF-8 text file")
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def token_stream(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> Tensor:
    """Token ids of ``texts`` in order, concatenated, at most ``max_tokens`` long.

    Empty lines are dropped; each text is encoded with the tokenizer's own special tokens (a BOS for Mixtral-style
    tokenizers, none for Qwen), and only as many texts are encoded as the budget needs.
    """
    ids: list[int] = []
    texts = [text for text in texts if text.strip()]
    for start in range(0, len(texts), _TOKENIZE_CHUNK_LINES):
        for encoded in tokenizer(list(texts[start : start + _TOKENIZE_CHUNK_LINES]))["input_ids"]:
            ids.extend(encoded)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def pack_blocks(stream: Tensor, seq_len: int, batch_size: int) -> list[Tensor]:
    """Cut a 1-D token stream into blocks of ``seq_len`` (the last may be shorter) and group them into batches.

    Returns:
        ``(B, T)`` long tensors: full blocks ``batch_size`` at a time, then the short last block on its own.
    """
    batches: list[Tensor] = []
    pending: list[Tensor] = []
    for block in stream.split(seq_len):
        if pending and (len(pending) == batch_size or block.numel() != pending[0].numel()):
            batches.append(torch.stack(pending))
            pending = []
        pending.append(block)
    if pending:
        batches.append(torch.stack(pending))
    return batches


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module):
        return embeddings.weight.device
    return next(model.parameters()).device


def capture_inputs(model: nn.Module, views: Sequence[Any], batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """Each view's ``(N, D)`` layer inputs over ``batches`` of token ids, in eval mode and without gradients.

    Uses the callbacks' hook machinery (:func:`moe_lightning.adapters.capture.capture_layer_inputs`); every
    submodule's train/eval mode is restored afterwards.
    """
    with restored_modes(model), torch.no_grad():
        return capture_layer_inputs(
            model,
            views,
            batches,
            forward=lambda m, input_ids: m(input_ids=input_ids, use_cache=False),
            device=_input_device(model),
        )


def _layer_summary(report: GeometryReport) -> dict[str, float]:
    """The headline numbers of one layer (means over experts; NaN where the probe did not measure it)."""
    scalars = report.scalars("")

    def get(key: str) -> float:
        return float(scalars.get(key, math.nan))

    return {
        "experts": float(report.num_experts),
        "tokens": float(report.total_tokens),
        "sigma_max": get("/jac_sigma_max/mean"),
        "jac_eff_rank": get("/jac_effective_rank/mean"),
        "align": get("/align_mean_offdiag"),
        "align_ratio": get("/align_ratio"),
        "pca_hidden_eff_rank": get("/pca_hidden_effective_rank/mean"),
    }


def format_summary(reports: dict[str, GeometryReport]) -> str:
    """A plain-text table, one row per layer: σ_max (mean over experts), Jacobian effective rank, mean off-diagonal
    mean-Jacobian alignment and its ratio to chance, PCA effective rank of the expert hidden activations; then a
    warning line for each layer whose matrix-free spectra did not all converge."""
    header = ("layer", "E", "tokens", "sigma_max", "jac_eff_rank", "align", "align/chance", "pca_hidden_eff_rank")
    rows = [header]
    for name, report in reports.items():
        s = _layer_summary(report)
        rows.append(
            (
                name,
                str(int(s["experts"])),
                str(int(s["tokens"])),
                *(
                    "n/a" if math.isnan(s[k]) else f"{s[k]:.4g}"
                    for k in ("sigma_max", "jac_eff_rank", "align", "align_ratio", "pca_hidden_eff_rank")
                ),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    for name, report in reports.items():
        expert = int(report.expert["jac_unconverged"].sum()) if "jac_unconverged" in report.expert else 0
        layer = int(report.layer.get("layer_jac_unconverged", 0))
        if expert or layer:
            lines.append(
                f"warning: {name}: the matrix-free top values of {expert} expert token(s) and {layer} layer token(s) "
                "did not converge (ProbeConfig.matrix_free_max_iter / matrix_free_tol); they are reported as they stand"
            )
    return "\n".join(lines)


def probe_pretrained(
    model_or_path: str | os.PathLike | nn.Module,
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None = None,
    *,
    tokenizer: Any = None,
    max_tokens: int = 512,
    seq_len: int = 256,
    batch_size: int = 4,
    layers: str | Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    probe_dtype: str = "float64",
    matrix_free_threshold: int = 1024,
    matrix_free_rank: int = 16,
    memory_budget_mib: int = 1024,
    trust_remote_code: bool = False,
    out_dir: str | os.PathLike | None = None,
    title: str | None = None,
) -> dict[str, GeometryReport]:
    """Probe every MoE layer of a pretrained causal LM on a text set (docs/geometry.md §1–5).

    The text is tokenized (empty lines dropped), concatenated, cut to ``max_tokens`` tokens and packed into
    blocks of ``seq_len`` tokens (the last block may be shorter); the model runs on them in eval mode under
    ``torch.no_grad`` while forward hooks capture each MoE layer's input, and
    ``moe_lightning.geometry.probe(view, x, ProbeConfig(...))`` measures each layer on those ``max_tokens``
    tokens. Layers wider than ``matrix_free_threshold`` use the matrix-free top-``matrix_free_rank`` spectra.

    Args:
        model_or_path: a local checkpoint directory or hub name (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; the model
            type is checked before any weight is loaded), or an already loaded model whose MoE layers
            :func:`~moe_lightning.adapters.find_moe_layers` recognises (it stays on its device and dtype, and its
            train/eval mode is restored).
        texts_or_file: a text file (one document per line), a list of texts, or a tensor of token ids (flattened
            into one stream); a ``bundled:<name>`` file ships with the package; None uses the bundled WikiText-2
            test split (``bundled:wikitext-2/test.txt``).
        tokenizer: a tokenizer, or where to load one from; None uses the model's own (its directory / hub name).
        max_tokens: tokens probed per layer.
        seq_len: block length of the forward passes.
        batch_size: blocks per forward pass.
        layers: keep only layers whose name matches one of these names or glob patterns.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; for a loaded model, ``"auto"`` leaves it where it is.
        dtype: dtype the checkpoint is loaded in (``"float32"``, ``"bfloat16"``, ``"float64"``); unused for a
            loaded model.
        probe_dtype: dtype of the probe's arithmetic (``"float64"`` or ``"float32"``); the probe casts each MoE
            block to it temporarily (``ProbeConfig.cast_module``).
        matrix_free_threshold: model dims above this use the matrix-free spectra.
        matrix_free_rank: singular values kept on the matrix-free path.
        memory_budget_mib: peak memory of one token chunk of the probe (``ProbeConfig.memory_budget_bytes``, in
            MiB). On the matrix-free path a chunk's tokens share every GEMM against the expert weights, so a larger
            budget batches more of them (at d = 4096 in float32, ~80 MiB per token).
        trust_remote_code: passed to ``transformers`` when loading.
        out_dir: if given, write ``probe.json`` and the rendered report
            (:func:`moe_lightning.report.render_probe`) there.
        title: report title; defaults to one naming the model.

    Returns:
        Layer name -> :class:`~moe_lightning.geometry.GeometryReport`, in model order.

    Raises:
        ValueError: unsupported or missing model, missing text, no MoE layers (or none matching ``layers``), bad
            option values.
    """
    reports, _ = _probe_and_write(
        model_or_path,
        texts_or_file,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        layers=layers,
        device=device,
        dtype=dtype,
        probe_dtype=probe_dtype,
        matrix_free_threshold=matrix_free_threshold,
        matrix_free_rank=matrix_free_rank,
        memory_budget_mib=memory_budget_mib,
        trust_remote_code=trust_remote_code,
        out_dir=out_dir,
        title=title,
    )
    return reports


def _probe_and_write(
    model_or_path: str | os.PathLike | nn.Module,
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None,
    *,
    tokenizer: Any,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    layers: str | Sequence[str] | None,
    device: str,
    dtype: str,
    probe_dtype: str,
    matrix_free_threshold: int,
    matrix_free_rank: int,
    memory_budget_mib: int,
    trust_remote_code: bool,
    out_dir: str | os.PathLike | None,
    title: str | None,
) -> tuple[dict[str, GeometryReport], list[str]]:
    """:func:`probe_pretrained`, also returning the written paths (empty without ``out_dir``)."""
    for name, value in (
        ("max_tokens", max_tokens),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("matrix_free_threshold", matrix_free_threshold),
        ("matrix_free_rank", matrix_free_rank),
        ("memory_budget_mib", memory_budget_mib),
    ):
        _positive_int(name, value)
    compute_dtype = _choice("probe_dtype", probe_dtype, PROBE_DTYPES)
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        _choice("dtype", dtype, MODEL_DTYPES)
        if device != "auto":
            model.to(_resolve_device(device))
        config = getattr(model, "config", None)
        model_type = str(getattr(config, "model_type", type(model).__name__))
        model_name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        if tokenizer is None and not isinstance(texts_or_file, Tensor):
            if not getattr(config, "_name_or_path", ""):
                raise ValueError("probe_pretrained: pass tokenizer= (or token ids) for a model without a name_or_path")
            tokenizer = config._name_or_path
    else:
        model_name = os.fspath(model_or_path)
        model, loaded_tokenizer, model_type = load_pretrained(
            model_or_path,
            tokenizer=tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = loaded_tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                os.fspath(tokenizer), local_files_only=_hub_offline(), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"could not load a tokenizer from {os.fspath(tokenizer)!r} ({type(error).__name__}: {error}); "
                "pass tokenizer= (a tokenizer object or a directory with one) or token ids"
            ) from error

    views = find_moe_layers(model)
    if not views:
        raise ValueError(
            f"found no MoE layers in {model_name!r} ({type(model).__name__}). {_supported_text()}; or register "
            "your layer class with moe_lightning.adapters.register_moe_class"
        )
    if layers is not None:
        selected = find_moe_layers(model, layers)
        if not selected:
            raise ValueError(
                f"no MoE layer matches layers={list([layers] if isinstance(layers, str) else layers)!r}; "
                f"the model's MoE layers are {[v.name for v in views]}"
            )
        views = selected

    text_source: str | None = None
    if isinstance(texts_or_file, Tensor):
        stream = texts_or_file.detach().reshape(-1).to(torch.long).cpu()[:max_tokens]
    else:
        if texts_or_file is None:
            texts_or_file = DEFAULT_TEXT_FILE
        if isinstance(texts_or_file, (str, os.PathLike)):
            # moe_lightning.data pulls in Lightning and datasets, which a probe run otherwise never imports.
            from moe_lightning.data.bundled import resolve_text_file

            text_source = os.fspath(texts_or_file)
            texts_or_file = resolve_text_file(text_source)
            texts = read_text_file(texts_or_file)
        else:
            texts = list(texts_or_file)
        stream = token_stream(tokenizer, texts, max_tokens)
    if stream.numel() == 0:
        raise ValueError("the text has no tokens; give a non-empty text file or list of texts")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and int(stream.max()) >= vocab:
        raise ValueError(
            f"token id {int(stream.max())} is out of range for the model's {vocab} embeddings; the tokenizer does "
            "not belong to this model (pass the right one with --tokenizer)"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}")

    batches = pack_blocks(stream, seq_len, batch_size)
    captured = capture_inputs(model, views, batches)
    probe_config = ProbeConfig(
        dtype=compute_dtype,
        matrix_free_threshold=matrix_free_threshold,
        matrix_free_rank=matrix_free_rank,
        memory_budget_bytes=memory_budget_mib * 2**20,
    )
    reports: dict[str, GeometryReport] = {}
    for view in views:
        x_ND = captured[view.name][:max_tokens]
        reports[view.name] = probe(view, x_ND, probe_config)

    paths: list[str] = []
    if out_dir is not None:
        run_config = {
            "text": text_source,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "max_tokens": max_tokens,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "layers": None if layers is None else ([layers] if isinstance(layers, str) else list(layers)),
            "device": str(_input_device(model)),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "probe_dtype": probe_dtype,
            "matrix_free_threshold": matrix_free_threshold,
            "matrix_free_rank": matrix_free_rank,
            "memory_budget_mib": memory_budget_mib,
            "trust_remote_code": trust_remote_code,
        }
        paths = write_outputs(
            reports,
            out_dir,
            model=model_name,
            model_type=model_type,
            tokens=int(stream.numel()),
            config=run_config,
            title=title or f"Geometry probe: {model_name} ({model_type}, {int(stream.numel())} tokens)",
        )
    return reports, paths


def write_outputs(
    reports: dict[str, GeometryReport],
    out_dir: str | os.PathLike,
    *,
    model: str,
    model_type: str,
    tokens: int,
    config: dict[str, Any],
    title: str,
) -> list[str]:
    """Write ``probe.json`` and the rendered report (tables, plots, index.html) into ``out_dir``.

    Returns:
        The written paths, ``probe.json`` first.
    """
    from moe_lightning.report import render_probe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model,
        "model_type": model_type,
        "tokens": tokens,
        "config": config,
        "layers": {name: report.to_dict() for name, report in reports.items()},
    }
    json_path = out / "probe.json"
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return [str(json_path), *render_probe(reports, str(out), title)]


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-lightning probe`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Probe the geometry (Jacobian spectra, weighted PCA, expert alignment, Grassmann subspaces) of every MoE "
            f"layer of a pretrained Hugging Face checkpoint on a text set. {_supported_text()}."
        ),
    )
    parser.add_argument("model", help="local checkpoint directory or hub name (cache only when offline)")
    parser.add_argument(
        "--text",
        default=None,
        help=f"UTF-8 text file, one document per line, or bundled:NAME for a file shipped with the package "
        f"(default: {DEFAULT_TEXT_FILE}, the WikiText-2 test split)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: MODEL)")
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="tokens probed per MoE layer (default: %(default)s)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=256, help="block length of the forward passes (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass (default: %(default)s)")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="probe only the MoE layers matching these names or globs (default: all)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default auto: CUDA when available")
    parser.add_argument(
        "--dtype",
        choices=list(MODEL_DTYPES),
        default="float32",
        help="dtype the model is loaded in (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-dtype",
        choices=list(PROBE_DTYPES),
        default="float64",
        help="dtype of the probe's arithmetic (default: %(default)s)",
    )
    parser.add_argument(
        "--matrix-free-threshold",
        type=int,
        default=1024,
        help="model dims above this use matrix-free top-r spectra (default: %(default)s)",
    )
    parser.add_argument(
        "--matrix-free-rank",
        type=int,
        default=16,
        help="singular values r kept on the matrix-free path (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-budget-mib",
        type=int,
        default=1024,
        help="peak memory of one token chunk of the probe; on the matrix-free path more tokens per chunk share "
        "the GEMMs against the weights (default: %(default)s)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to transformers")
    parser.add_argument("--out", default=None, help="output directory (default: probe-<model basename>)")
    return parser


def default_out_dir(model: str) -> str:
    """``probe-<basename>``: ``probe-Mixtral-8x7B-v0.1`` for ``mistralai/Mixtral-8x7B-v0.1`` or a local directory."""
    base = Path(os.fspath(model).rstrip("/\\")).name or "model"
    return f"probe-{base}"


def main(argv: list[str]) -> int:
    """``moe-lightning probe MODEL [options]``; returns the exit code (2 on a bad model, text or option)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage/error (or --help)
        return int(exit_.code or 0)
    out_dir = args.out or default_out_dir(args.model)
    try:
        reports, paths = _probe_and_write(
            args.model,
            args.text,
            tokenizer=args.tokenizer,
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            layers=args.layers,
            device=args.device,
            dtype=args.dtype,
            probe_dtype=args.probe_dtype,
            matrix_free_threshold=args.matrix_free_threshold,
            matrix_free_rank=args.matrix_free_rank,
            memory_budget_mib=args.memory_budget_mib,
            trust_remote_code=args.trust_remote_code,
            out_dir=out_dir,
            title=None,
        )
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(reports))
    print(f"wrote {len(paths)} files to {out_dir}:")
    for path in paths:
        print(f"  {path}")
    return 0
