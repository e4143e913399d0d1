"""The geometry of a pretrained Hugging Face MoE checkpoint (Mixtral, Qwen-MoE, OLMoE), the analysis of the second
paper (arXiv 2605.16349): ``moe-lightning probe`` and :func:`probe_pretrained`; this package re-exports their names.

Run the model over a text set, capture the input of every MoE layer with forward hooks, and call
:func:`moe_lightning.geometry.probe` on each layer (Jacobian spectra, weighted PCA, cross-expert alignment,
Grassmann subspaces; docs/geometry.md). Modules: ``options`` (:class:`ProbeOptions`, every option once), ``load``
(the checkpoint), ``text`` (tokens and blocks), ``offload`` (a checkpoint that ``accelerate`` spreads over GPUs, CPU
memory and disk, probed one layer's weights at a time; the peak memory), ``run`` (capture, probe, summary), ``write``
(``probe.json`` and the report), ``command`` (the command line).

Shape legend: ``B`` blocks per batch, ``T`` block length (``--seq-len``), ``N`` tokens, ``D`` model dim.

From Python, on a model that is already loaded::

    reports = probe_pretrained(model, ["some text", "more text"], tokenizer=tokenizer, max_tokens=256)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.commands.probe.command import build_parser, main
    from moe_lightning.commands.probe.load import load_pretrained, resolve_model, supported_model_types
    from moe_lightning.commands.probe.options import ProbeOptions
    from moe_lightning.commands.probe.run import (
        ProbeRun,
        capture_inputs,
        format_summary,
        probe_and_write,
        probe_pretrained,
    )
    from moe_lightning.commands.probe.text import pack_blocks, read_text_file, token_stream
    from moe_lightning.commands.probe.write import default_out_dir, write_outputs

# Public name -> the module that defines it, imported on first use: `moe-lightning probe --help` needs neither
# transformers nor the probe.
_SOURCES = {
    "ProbeOptions": "options",
    "ProbeRun": "run",
    "build_parser": "command",
    "capture_inputs": "run",
    "default_out_dir": "write",
    "format_summary": "run",
    "load_pretrained": "load",
    "main": "command",
    "pack_blocks": "text",
    "probe_and_write": "run",
    "probe_pretrained": "run",
    "read_text_file": "text",
    "resolve_model": "load",
    "supported_model_types": "load",
    "token_stream": "text",
    "write_outputs": "write",
}

__all__ = [
    "ProbeOptions",
    "ProbeRun",
    "build_parser",
    "capture_inputs",
    "default_out_dir",
    "format_summary",
    "load_pretrained",
    "main",
    "pack_blocks",
    "probe_and_write",
    "probe_pretrained",
    "read_text_file",
    "resolve_model",
    "supported_model_types",
    "token_stream",
    "write_outputs",
]


__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
