"""The probe of a pretrained model: capture each MoE layer's input over the text, call
:func:`moe_lightning.geometry.probe` on it, and summarise the layers in a plain-text table."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moe_lightning.adapters import scan_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.adapters.registry import skipped_text, warn_skipped
from moe_lightning.adapters.verify import check_views
from moe_lightning.commands.probe.load import check_tokenizer_location, prepare_model, supported_text
from moe_lightning.commands.probe.offload import LayerWeights, format_peak_memory, peak_memory, reset_peak_memory
from moe_lightning.commands.probe.options import ProbeOptions, options_from_keywords, with_option_keywords
from moe_lightning.commands.probe.text import check_tokens, pack_blocks, read_texts, text_tokens
from moe_lightning.commands.probe.write import run_config, write_outputs
from moe_lightning.common import restored_modes
from moe_lightning.geometry import GeometryReport, probe
from moe_lightning.geometry.weight_spectra import layer_weight_spectra


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: the device its input embeddings run on (the execution device of their
    ``accelerate`` hook where the model is dispatched, their weights' device otherwise; else the device of the
    model's first parameter)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module):
        execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
        return torch.device(execution) if execution is not None else embeddings.weight.device
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
            device=input_device(model),
        )


def select_views(
    model: nn.Module,
    model_name: str,
    layers: list[str] | None,
    context: Callable[[nn.Module], AbstractContextManager[None]] | None = None,
) -> list[Any]:
    """The model's MoE layers (those matching ``layers`` when given); a ``ValueError`` when there are none.

    ``context(block)`` is entered while the adapters build a block's views (see
    :func:`~moe_lightning.adapters.scan_moe_layers`); the model is scanned once.
    """
    scan = scan_moe_layers(model, context=context)
    views = scan.views
    if not views:
        skipped = (
            f" These modules look like MoE blocks but cannot be viewed exactly:\n{skipped_text(scan.skipped)}\n"
            if scan.skipped
            else " "
        )
        raise ValueError(
            f"found no MoE layers in {model_name!r} ({type(model).__name__}).{skipped}{supported_text()}; or "
            "register your layer class with moe_lightning.adapters.register_moe_class"
        )
    if layers is None:
        return views
    matching = scan.matching(layers)
    warn_skipped("probe", matching.skipped)
    selected = matching.views
    if not selected:
        raise ValueError(
            f"no MoE layer matches layers={layers!r}; the model's MoE layers are {[v.name for v in views]}"
        )
    return selected


def verified(
    views: Sequence[Any],
    captured: dict[str, Tensor],
    dtype: torch.dtype,
    context: Callable[[Any], AbstractContextManager[None]] | None = None,
) -> list[Any]:
    """The views that pass their check on the captured tokens (:func:`moe_lightning.geometry.verify_view`); one
    warning for each that fails, naming the layer, the check and the size of the miss. A ``ValueError`` when none
    passes. ``context(view)`` is entered around the check of each layer."""
    checks = check_views(views, captured, dtype, context)
    for view in views:
        if not checks[view.name].passed:
            warnings.warn(f"probe: {checks[view.name].message()}; no value of {view.name!r} is reported", stacklevel=2)
    kept = [view for view in views if checks[view.name].passed]
    if not kept:
        raise ValueError(f"probe: no MoE layer passed the view check ({len(views)} refused; see the warnings)")
    return kept


def weight_spectra(view: Any) -> dict[str, Any] | None:
    """The data-free weight spectra of the view's experts (docs/geometry.md §8) for ``probe.json``:
    :meth:`~moe_lightning.geometry.weight_spectra.WeightSpectra.to_dict`, or None for a view that does not offer its
    weights, or (with a warning) one whose weights cannot be read. Called while the layer's weights are on the
    execution device, as its probe is."""
    try:
        with torch.no_grad():
            spectra = layer_weight_spectra(view)
    except Exception as error:  # the geometry is still written
        warnings.warn(f"probe: the weight spectra of {view.name!r} are not written: {error!r}", stacklevel=2)
        return None
    return None if spectra is None else spectra.to_dict()


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


def format_summary(reports: dict[str, GeometryReport], peak: dict[str, Any] | None = None) -> str:
    """A plain-text table, one row per layer: σ_max (mean over experts), Jacobian effective rank, mean off-diagonal
    mean-Jacobian alignment and its ratio to chance, PCA effective rank of the expert hidden activations; then a
    warning line for each layer whose matrix-free spectra did not all converge, and the peak memory when given."""
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
    if peak is not None:
        lines.append(format_peak_memory(peak))
    return "\n".join(lines)


@with_option_keywords
def probe_pretrained(
    model_or_path: str | os.PathLike | nn.Module,
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None = None,
    **options: Any,
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
        **options: the fields of :class:`~moe_lightning.commands.probe.options.ProbeOptions`, by keyword, with their
            defaults there (``tokenizer``, ``max_tokens=512``, ``seq_len=256``, ``batch_size=4``, ``layers``,
            ``device="auto"``, ``dtype="float32"``, ``probe_dtype="float64"``, ``matrix_free_threshold=1024``,
            ``matrix_free_rank=16``, ``memory_budget_mib=1024``, ``trust_remote_code=False``,
            ``device_map="none"``, ``max_memory``, ``offload_folder``, ``out_dir``, ``title``). With ``out_dir``,
            ``probe.json`` and the rendered report are written there. ``device_map="auto"`` loads a checkpoint
            larger than one device with ``accelerate`` (docs/probe.md, "Checkpoints larger than one device").

    Returns:
        Layer name -> :class:`~moe_lightning.geometry.GeometryReport`, in model order.

    Raises:
        ValueError: unsupported or missing model, missing text, no MoE layers (or none matching ``layers``), bad
            option values.
        TypeError: a keyword that is not an option.
    """
    run = probe_and_write(model_or_path, texts_or_file, options_from_keywords("probe_pretrained", options))
    return run.reports


class ProbeRun(NamedTuple):
    """What :func:`probe_and_write` returns.

    Attributes:
        reports: layer name -> report, in model order.
        paths: the files written, ``probe.json`` first (empty without ``out_dir``).
        peak_memory: the run's peak memory (:func:`~moe_lightning.commands.probe.offload.peak_memory`).
    """

    reports: dict[str, GeometryReport]
    paths: list[str]
    peak_memory: dict[str, Any]


def probe_and_write(
    model_or_path: str | os.PathLike | nn.Module,
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None,
    options: ProbeOptions,
) -> ProbeRun:
    """:func:`probe_pretrained` with its options as one object, also returning the written paths (empty without
    ``options.out_dir``) and the peak memory of the run.

    On a model that ``accelerate`` dispatched (``device_map="auto"``, or a model passed dispatched), the forward
    passes move each module's weights onto the execution device as it runs; each MoE layer's weights are brought
    there again while its views are built, checked and probed, one layer at a time
    (:mod:`~moe_lightning.commands.probe.offload`).
    """
    # Every input is checked before the model loads: the text, the tokenizer's path (the model's is checked, with
    # its model type, before any weight is read).
    texts, text_source = read_texts(texts_or_file)
    check_tokenizer_location(options.tokenizer)
    reset_peak_memory()
    loaded = prepare_model(model_or_path, options, needs_tokenizer=not isinstance(texts, Tensor))
    model = loaded.model
    weights = LayerWeights(model)
    views = select_views(model, loaded.name, options.layer_patterns, weights.module_context)
    stream = text_tokens(texts, loaded.tokenizer, options.max_tokens)
    check_tokens(stream, model, options.seq_len)

    captured = capture_inputs(model, views, pack_blocks(stream, options.seq_len, options.batch_size))
    probe_config = options.probe_config()
    views = verified(views, captured, probe_config.dtype, weights.view_context)
    reports, spectra = {}, {}
    for view in views:
        with weights.view_context(view):
            reports[view.name] = probe(view, captured[view.name][: options.max_tokens], probe_config)
            if options.out_dir is not None and (found := weight_spectra(view)) is not None:
                spectra[view.name] = found
    peak = peak_memory(input_device(model))
    if options.out_dir is None:
        return ProbeRun(reports, [], peak)
    tokens = int(stream.numel())
    config = run_config(
        options,
        text=text_source,
        tokenizer=loaded.tokenizer,
        device=input_device(model),
        dtype=next(model.parameters()).dtype,
    )
    paths = write_outputs(
        reports,
        options.out_dir,
        model=loaded.name,
        model_type=loaded.model_type,
        tokens=tokens,
        config=config,
        title=options.title or f"Geometry probe: {loaded.name} ({loaded.model_type}, {tokens} tokens)",
        peak_memory=peak,
        weights=spectra,
    )
    return ProbeRun(reports, paths, peak)
