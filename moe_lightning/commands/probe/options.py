"""The options of a pretrained-model probe, declared once in :class:`ProbeOptions`: their defaults, types and help
text, from which ``probe_pretrained``'s keyword arguments and the ``moe-lightning probe`` flags are both made."""

from __future__ import annotations

import argparse
import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from moe_lightning.common import check_choice, check_positive_int, dtype_from_name
from moe_lightning.geometry import ProbeConfig

DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("none", "auto")  # the whole model on one device, or placed by accelerate within max_memory
MODEL_DTYPES = ("float32", "bfloat16", "float64")  # what a checkpoint is loaded in
PROBE_DTYPES = ("float64", "float32")  # what the probe computes in
DEFAULT_TEXT_FILE = "bundled:wikitext-2/test.txt"
# Decimal and binary units, as accelerate's convert_file_size_to_int reads them.
MEMORY_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
MEMORY_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_MEMORY_ENTRY = re.compile(r"^\s*(cpu|\d+)\s*=\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_MEMORY_FORMAT = (
    "comma-separated DEVICE=SIZE entries, DEVICE a GPU index or cpu and SIZE a number with a unit of "
    "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 'cpu=2GiB' or '0=70GiB,cpu=100GiB')"
)


def parse_max_memory(value: str | Mapping[int | str, int | str]) -> dict[int | str, int]:
    """The ``max_memory`` option as ``accelerate`` takes it: GPU index or ``"cpu"`` -> bytes.

    Args:
        value: ``"0=70GiB,cpu=100GiB"``, or a mapping of the same (sizes as bytes or as strings).

    Raises:
        ValueError: a malformed entry, a device other than a GPU index or ``cpu``, a unit not listed, a size of 0,
            or a device named twice; the message names ``max_memory`` and the format.
    """
    entries = value.items() if isinstance(value, Mapping) else [(None, part) for part in str(value).split(",")]
    parsed: dict[int | str, int] = {}
    for key, size in entries:
        text = f"{key}={size}" if key is not None else size
        match = _MEMORY_ENTRY.match(str(text))
        unit = match.group(3).upper() if match else ""
        if match is None or (unit and unit not in MEMORY_UNITS) or (not unit and not match.group(2).isdigit()):
            raise ValueError(
                f"max_memory={value!r} is not understood at {str(text).strip()!r}; expected {_MEMORY_FORMAT}"
            )
        device = match.group(1).lower()
        device_key: int | str = int(device) if device.isdigit() else device
        size_bytes = int(float(match.group(2)) * MEMORY_UNITS[unit or "B"])
        if size_bytes < 1:
            raise ValueError(f"max_memory={value!r} gives {device} no memory; every size must be above 0")
        if device_key in parsed:
            raise ValueError(f"max_memory={value!r} names {device} twice; name each device once")
        parsed[device_key] = size_bytes
    return parsed


def option(default: Any, help: str, **cli: Any) -> Any:
    """A :class:`ProbeOptions` field: its default, its help text and how the command line spells it.

    Args:
        default: the default, for the Python API and the command alike.
        help: one sentence for ``--help`` and the docs.
        **cli: extra ``argparse.add_argument`` keywords (``choices``, ``nargs``, ``metavar``); ``flag`` renames the
            flag (default ``--<name with dashes>``); ``cli=False`` keeps the option off the command line.
    """
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class ProbeOptions:
    """How a pretrained model is probed (every option of ``probe_pretrained`` and ``moe-lightning probe``).

    The help text of each option is the ``help`` of its field (``ProbeOptions.help(name)``); the values are checked
    on construction, so a bad value fails before any model is loaded.
    """

    tokenizer: Any = option(None, "tokenizer directory or hub name, or a tokenizer object (default: the model's own)")
    max_tokens: int = option(512, "tokens probed per MoE layer")
    seq_len: int = option(256, "block length of the forward passes")
    batch_size: int = option(4, "blocks per forward pass")
    layers: str | Sequence[str] | None = option(
        None, "probe only the MoE layers matching these names or globs (default: all)", nargs="+", metavar="GLOB"
    )
    device: str = option(
        "auto", "auto (CUDA when available; a loaded model stays where it is), cpu or cuda", choices=DEVICES
    )
    dtype: str = option(
        "float32",
        "dtype the checkpoint is loaded in (float64 selects the eager experts kernel: grouped_mm has no float64 CPU "
        "kernel); unused for a loaded model",
        choices=MODEL_DTYPES,
    )
    probe_dtype: str = option(
        "float64",
        "dtype of the probe's arithmetic; each MoE block is probed on copies of its weights cast to it "
        "(ProbeConfig.cast_module)",
        choices=PROBE_DTYPES,
    )
    matrix_free_threshold: int = option(1024, "model dims above this use the matrix-free top-r spectra")
    matrix_free_products_dtype: str = option(
        "float32",
        "dtype of the matrix-free products with J and its transpose (the top-r Krylov solve, Hutchinson, SLQ) "
        "and of the Grams of a sampled pointwise alignment; "
        "their bases, recurrences and sums stay in --probe-dtype (ProbeConfig.matrix_free_products_dtype, "
        "docs/geometry.md §1)",
        choices=PROBE_DTYPES,
    )
    matrix_free_rank: int = option(16, "singular values r kept on the matrix-free path")
    pointwise_alignment_pairs: int | None = option(
        None,
        "compute the pointwise alignment on this many pairs of experts drawn at random, with a standard error over "
        "pairs, when a layer has more (ProbeConfig.pointwise_alignment_pairs; each pair forms one Gram of the "
        "weights, about half a CPU minute at Qwen3-30B-A3B's size); default: every pair, exact",
        type=int,
        metavar="M",
    )
    memory_budget_mib: int = option(
        1024,
        "peak memory of one token chunk of the probe in MiB (ProbeConfig.memory_budget_bytes); on the matrix-free "
        "path a chunk's tokens share every GEMM against the expert weights, so a larger budget batches more of them "
        "(at d = 4096 in float32, ~80 MiB per token)",
    )
    trust_remote_code: bool = option(False, "passed to transformers when loading")
    device_map: str = option(
        "none",
        "none (the whole model on --device) or auto: accelerate places the checkpoint's layers on the GPUs and the "
        "CPU within --max-memory and the rest in --offload-folder, and each MoE layer's weights come onto the "
        "execution device only while the layer runs, is checked and is probed (a checkpoint larger than one device)",
        choices=DEVICE_MAPS,
    )
    max_memory: str | Mapping[int | str, int | str] | None = option(
        None,
        f"with --device-map auto, the memory accelerate may fill on each device: {_MEMORY_FORMAT}; default: the free "
        "memory of every device (of the CPU alone with --device cpu)",
    )
    offload_folder: str | os.PathLike | None = option(
        None, "with --device-map auto, where the weights that fit in no device's --max-memory are kept (disk offload)"
    )
    out_dir: str | os.PathLike | None = option(
        None,
        "write probe.json and the rendered report (moe_lightning.report.render_probe) here (the command's default: "
        "probe-<model basename>)",
        flag="--out",
    )
    title: str | None = option(None, "report title (default: one naming the model)", cli=False)

    def __post_init__(self) -> None:
        for name in (
            "max_tokens",
            "seq_len",
            "batch_size",
            "matrix_free_threshold",
            "matrix_free_rank",
            "memory_budget_mib",
        ):
            check_positive_int(name, getattr(self, name))
        check_choice("probe_dtype", self.probe_dtype, PROBE_DTYPES)
        check_choice("matrix_free_products_dtype", self.matrix_free_products_dtype, PROBE_DTYPES)
        check_choice("dtype", self.dtype, MODEL_DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("device_map", self.device_map, DEVICE_MAPS)
        if self.max_memory is not None:
            memory = parse_max_memory(self.max_memory)
            gpus = [key for key in memory if key != "cpu"]
            if self.device == "cpu" and gpus:
                raise ValueError(
                    f"max_memory={self.max_memory!r} gives memory to GPU {gpus[0]} but device='cpu'; give cpu alone, "
                    "or use device='cuda' or 'auto'"
                )
        if self.pointwise_alignment_pairs is not None:
            ProbeConfig(pointwise_alignment_pairs=self.pointwise_alignment_pairs)  # its error names the field
        unused = [name for name in ("max_memory", "offload_folder") if getattr(self, name) is not None]
        if unused and self.device_map != "auto":
            raise ValueError(
                f"{unused[0]} places the checkpoint with accelerate, which needs device_map='auto' (--device-map "
                f"auto); got device_map={self.device_map!r}"
            )

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of option ``name``."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    @property
    def layer_patterns(self) -> list[str] | None:
        """``layers`` as a list (None: every layer)."""
        return None if self.layers is None else ([self.layers] if isinstance(self.layers, str) else list(self.layers))

    @property
    def memory_map(self) -> dict[int | str, int] | None:
        """``max_memory`` as ``accelerate`` takes it (GPU index or ``"cpu"`` -> bytes), or None."""
        return None if self.max_memory is None else parse_max_memory(self.max_memory)

    def probe_config(self) -> ProbeConfig:
        """The :class:`~moe_lightning.geometry.ProbeConfig` these options ask for."""
        return ProbeConfig(
            dtype=dtype_from_name("probe_dtype", self.probe_dtype, PROBE_DTYPES),
            matrix_free_threshold=self.matrix_free_threshold,
            matrix_free_rank=self.matrix_free_rank,
            matrix_free_products_dtype=dtype_from_name(
                "matrix_free_products_dtype", self.matrix_free_products_dtype, PROBE_DTYPES
            ),
            memory_budget_bytes=self.memory_budget_mib * 2**20,
            pointwise_alignment_pairs=self.pointwise_alignment_pairs,
        )


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ProbeOptions` field: ``--max-tokens N`` for ``max_tokens: int``, a switch for a
    bool, the field's ``choices``/``nargs``/``metavar``, its default and its help with the default appended."""
    for f in fields(ProbeOptions):
        cli = dict(f.metadata["cli"])
        if cli.pop("cli", True) is False:
            continue
        flag = cli.pop("flag", "--" + f.name.replace("_", "-"))
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        if f.default is not None:
            help_text += " (default: %(default)s)"
        kind = cli.pop("type", int if isinstance(f.default, int) else str)
        cli.setdefault("metavar", flag.removeprefix("--").replace("-", "_").upper())
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text, **cli)


def options_from_args(args: argparse.Namespace) -> ProbeOptions:
    """The :class:`ProbeOptions` of parsed arguments (fields without a flag keep their defaults)."""
    return ProbeOptions(**{f.name: getattr(args, f.name) for f in fields(ProbeOptions) if hasattr(args, f.name)})


def options_from_keywords(function: str, keywords: dict[str, Any]) -> ProbeOptions:
    """``ProbeOptions(**keywords)``, with the ``TypeError`` of an unknown keyword naming ``function``."""
    known = {f.name for f in fields(ProbeOptions)}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword arguments {unknown}; the options are {sorted(known)}")
    return ProbeOptions(**keywords)


def with_option_keywords(function: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``function(..., **options)`` a signature that lists every :class:`ProbeOptions` field as a keyword-only
    parameter with its default, so ``help()`` and ``inspect.signature`` show them."""
    signature = inspect.signature(function)
    positional = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keywords = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(ProbeOptions)
        if f.default is not MISSING
    ]
    function.__signature__ = signature.replace(parameters=[*positional, *keywords])  # type: ignore[attr-defined]
    return function
