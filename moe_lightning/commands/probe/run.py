"""The probe of a pretrained model: capture each MoE layer's input over the text, call
:func:`moe_lightning.geometry.probe` on it, and summarise the layers in a plain-text table."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.adapters import find_moe_layers, scan_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.adapters.registry import skipped_text
from moe_lightning.adapters.verify import check_views
from moe_lightning.commands.probe.load import check_tokenizer_location, prepare_model, supported_text
from moe_lightning.commands.probe.options import ProbeOptions, options_from_keywords, with_option_keywords
from moe_lightning.commands.probe.text import check_tokens, pack_blocks, read_texts, text_tokens
from moe_lightning.commands.probe.write import run_config, write_outputs
from moe_lightning.common import restored_modes
from moe_lightning.geometry import GeometryReport, probe
from moe_lightning.geometry.weight_spectra import layer_weight_spectra


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: the device of its input embeddings (else of its first parameter)."""
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
            device=input_device(model),
        )


def select_views(model: nn.Module, model_name: str, layers: list[str] | None) -> list[Any]:
    """The model's MoE layers (those matching ``layers`` when given); a ``ValueError`` when there are none."""
    scan = scan_moe_layers(model)
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
    selected = find_moe_layers(model, layers)
    if not selected:
        raise ValueError(
            f"no MoE layer matches layers={layers!r}; the model's MoE layers are {[v.name for v in views]}"
        )
    return selected


def verified(views: Sequence[Any], captured: dict[str, Tensor], dtype: torch.dtype) -> list[Any]:
    """The views that pass their check on the captured tokens (:func:`moe_lightning.geometry.verify_view`); one
    warning for each that fails, naming the layer, the check and the size of the miss. A ``ValueError`` when none
    passes."""
    checks = check_views(views, captured, dtype)
    for view in views:
        if not checks[view.name].passed:
            warnings.warn(f"probe: {checks[view.name].message()}; no value of {view.name!r} is reported", stacklevel=2)
    kept = [view for view in views if checks[view.name].passed]
    if not kept:
        raise ValueError(f"probe: no MoE layer passed the view check ({len(views)} refused; see the warnings)")
    return kept


def weight_spectra(views: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The data-free weight spectra of each view's experts (docs/geometry.md §8) for ``probe.json``: layer name ->
    :meth:`~moe_lightning.geometry.weight_spectra.WeightSpectra.to_dict`. A view that does not offer its weights
    has none; one whose weights cannot be read (an offloaded checkpoint's) has none, with a warning."""
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for view in views:
            try:
                spectra = layer_weight_spectra(view)
            except Exception as error:  # the geometry is still written
                warnings.warn(f"probe: the weight spectra of {view.name!r} are not written: {error!r}", stacklevel=2)
                continue
            if spectra is not None:
                out[view.name] = spectra.to_dict()
    return out


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
            ``matrix_free_rank=16``, ``memory_budget_mib=1024``, ``trust_remote_code=False``, ``out_dir``,
            ``title``). With ``out_dir``, ``probe.json`` and the rendered report are written there.

    Returns:
        Layer name -> :class:`~moe_lightning.geometry.GeometryReport`, in model order.

    Raises:
        ValueError: unsupported or missing model, missing text, no MoE layers (or none matching ``layers``), bad
            option values.
        TypeError: a keyword that is not an option.
    """
    reports, _ = probe_and_write(model_or_path, texts_or_file, options_from_keywords("probe_pretrained", options))
    return reports


def probe_and_write(
    model_or_path: str | os.PathLike | nn.Module,
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None,
    options: ProbeOptions,
) -> tuple[dict[str, GeometryReport], list[str]]:
    """:func:`probe_pretrained` with its options as one object, also returning the written paths (empty without
    ``options.out_dir``)."""
    # Every input is checked before the model loads: the text, the tokenizer's path (the model's is checked, with
    # its model type, before any weight is read).
    texts, text_source = read_texts(texts_or_file)
    check_tokenizer_location(options.tokenizer)
    loaded = prepare_model(model_or_path, options, needs_tokenizer=not isinstance(texts, Tensor))
    model = loaded.model
    views = select_views(model, loaded.name, options.layer_patterns)
    stream = text_tokens(texts, loaded.tokenizer, options.max_tokens)
    check_tokens(stream, model, options.seq_len)

    captured = capture_inputs(model, views, pack_blocks(stream, options.seq_len, options.batch_size))
    probe_config = options.probe_config()
    views = verified(views, captured, probe_config.dtype)
    reports = {view.name: probe(view, captured[view.name][: options.max_tokens], probe_config) for view in views}
    if options.out_dir is None:
        return reports, []
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
        weights=weight_spectra(views),
    )
    return reports, paths
