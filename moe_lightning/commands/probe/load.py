"""Finding and loading a pretrained checkpoint: the model type is checked against the adapters before any weight
is read, and a hub name is looked up in the local cache when offline or when the hub does not answer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lightning.adapters.hf_families import supported_model_types as supported_hf_model_types
from moe_lightning.commands.probe.offload import is_dispatched
from moe_lightning.commands.probe.options import DEVICE_MAPS, DEVICES, MODEL_DTYPES, ProbeOptions
from moe_lightning.common import check_choice, dtype_from_name, hf_offline_mode, hub_reachable


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values the adapters read: every model type of the installed ``transformers`` whose
    modeling code builds its MoE blocks on the experts interface (``moe_lightning.adapters.hf_families``)."""
    return supported_hf_model_types()


def supported_text() -> str:
    """The sentence naming the supported model types, for error messages."""
    return (
        "Supported model types (every MoE family of the installed transformers built on its experts interface): "
        + ", ".join(supported_model_types())
    )


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


def _locate(name: str) -> tuple[str, bool]:
    """``(where to load from, local_files_only)``: a local checkpoint directory, or a hub name to be read from the
    cache only when offline mode is on or the hub does not answer."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"model {name!r} is a file; expected a checkpoint directory or a hub name")
        if not (local / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json, so it is not a Hugging Face checkpoint")
        return str(local), False
    if not _looks_like_hub_id(name):
        raise ValueError(
            f"model path {name!r} does not exist, and it is not a hub name (org/name); give a local checkpoint "
            "directory or a hub name"
        )
    if hf_offline_mode():
        return name, True
    import huggingface_hub

    return name, not hub_reachable(huggingface_hub.constants.ENDPOINT)


def check_tokenizer_location(tokenizer: Any) -> None:
    """Fail before any model loads when ``tokenizer`` names a local path that does not exist and cannot be a hub
    name (a tokenizer object, None, an existing path or a hub name pass)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return
    name = os.fspath(tokenizer)
    if not Path(name).expanduser().exists() and not _looks_like_hub_id(name):
        raise ValueError(
            f"tokenizer path {name!r} does not exist, and it is not a hub name (org/name); give a directory or hub "
            "name that has a tokenizer"
        )


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

    name, local_files_only = _locate(os.fspath(model))
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
            "hub name"
        ) from error
    model_type = config_dict.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(
            f"model {name!r} has model_type={model_type!r}, which has no MoE adapter. {supported_text()}. "
            "Other MoE layers can be registered with moe_lightning.adapters.register_moe_class and probed with "
            "probe_pretrained(model, ...)."
        )
    return name, config_dict, local_files_only


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (which must be available) as a device."""
    check_choice("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(name: str | os.PathLike, *, local_files_only: bool, trust_remote_code: bool, hint: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)``; a failure is a ``ValueError`` that ends with ``hint``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.fspath(name), local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load a tokenizer from {os.fspath(name)!r} ({type(error).__name__}: {error}); {hint}"
        ) from error


def load_pretrained(
    model: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str = "none",
    max_memory: dict[int | str, int] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a supported MoE checkpoint and its tokenizer, in eval mode; the model type is checked first.

    Args:
        model: a local directory or a hub name.
        tokenizer: where to load the tokenizer from; None uses ``model``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float64"`` (float64 selects the eager experts kernel, because
            ``grouped_mm`` has no float64 CPU kernel).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        trust_remote_code: passed to ``transformers``.
        device_map: ``"none"`` (the whole model on ``device``) or ``"auto"``: ``accelerate`` places the layers on
            the GPUs and the CPU within ``max_memory`` and the rest in ``offload_folder``, and moves each module's
            weights onto the execution device during its forward (``from_pretrained(device_map="auto")``).
        max_memory: with ``device_map="auto"``, GPU index or ``"cpu"`` -> bytes; None, the free memory of each device
            (of the CPU alone when ``device`` is the CPU).
        offload_folder: with ``device_map="auto"``, where the weights that fit nowhere are written (disk offload).

    Returns:
        ``(model, tokenizer, model_type)``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype_from_name("dtype", dtype, MODEL_DTYPES)
    check_choice("device_map", device_map, DEVICE_MAPS)
    target = resolve_device(device)
    name, config_dict, local_files_only = resolve_model(model, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    if torch_dtype == torch.float64:
        kwargs["experts_implementation"] = "eager"
    if device_map == "auto":
        kwargs.update(dispatch_arguments(target, max_memory, offload_folder))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except OSError as error:
        raise ValueError(f"could not load the weights of {name!r}: {error}") from error
    except ValueError as error:
        if device_map == "auto" and offload_folder is None and "offload" in str(error):
            raise ValueError(
                f"the weights of {name!r} do not fit in max_memory={max_memory!r}: give --offload-folder (a folder "
                f"for the rest) or more --max-memory ({str(error).splitlines()[0]})"
            ) from error
        raise
    loaded = (loaded if device_map == "auto" else loaded.to(target)).eval()
    tok = load_tokenizer(
        name if tokenizer is None else tokenizer,
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
        hint="pass --tokenizer with a directory or hub name that has one",
    )
    return loaded, tok, str(config_dict["model_type"])


def dispatch_arguments(
    target: torch.device, max_memory: dict[int | str, int] | None, offload_folder: str | os.PathLike | None
) -> dict[str, Any]:
    """The ``from_pretrained`` keywords that let ``accelerate`` place a checkpoint over ``max_memory``.

    On the CPU only the ``cpu`` entry may be given (a GPU would otherwise be filled first); its default is the
    memory the machine has free. On CUDA, without ``max_memory``, ``accelerate`` takes the free memory of every
    device.
    """
    if target.type == "cpu":
        gpus = [key for key in (max_memory or {}) if key != "cpu"]
        if gpus:
            raise ValueError(
                f"max_memory gives memory to GPU {gpus[0]}, but the model runs on the CPU (device={target.type!r}, "
                "or no CUDA device is available); give cpu alone"
            )
        if max_memory is None:
            import psutil

            max_memory = {"cpu": int(psutil.virtual_memory().available)}
    elif max_memory is not None and not any(key != "cpu" for key in max_memory):
        raise ValueError(
            f"max_memory={max_memory!r} gives no GPU any memory, but the model runs on {target}; add an entry for "
            "it (e.g. '0=70GiB,cpu=100GiB'), or use device='cpu'"
        )
    arguments: dict[str, Any] = {"device_map": "auto", "max_memory": max_memory}
    if offload_folder is not None:
        arguments["offload_folder"] = os.fspath(offload_folder)
    return arguments


@dataclass
class LoadedModel:
    """A model ready to probe, with what the probe needs to know about it.

    Attributes:
        model: the causal LM.
        tokenizer: its tokenizer; None only when the text comes as token ids.
        name: the checkpoint's path or hub name (or the class name of a model without one).
        model_type: ``config.model_type`` (or the class name).
    """

    model: nn.Module
    tokenizer: Any
    name: str
    model_type: str


def prepare_model(
    model_or_path: str | os.PathLike | nn.Module, options: ProbeOptions, needs_tokenizer: bool
) -> LoadedModel:
    """Load ``model_or_path`` (or take a loaded model, moved to ``options.device`` unless that is ``"auto"``) and
    its tokenizer: ``options.tokenizer`` when it is a tokenizer object, loaded from where it names, or the model's
    own."""
    tokenizer = options.tokenizer
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if options.device_map != "none":
            raise ValueError(
                f"device_map={options.device_map!r} places a checkpoint the probe loads; a loaded model is probed "
                "where it is (dispatch it with accelerate, or from_pretrained(device_map=...), before passing it)"
            )
        if options.device != "auto":
            if is_dispatched(model):
                raise ValueError(
                    f"device={options.device!r} would move a model that accelerate dispatched (it has hooks); pass "
                    "device='auto', which probes it where it is"
                )
            model.to(resolve_device(options.device))
        config = getattr(model, "config", None)
        model_type = str(getattr(config, "model_type", type(model).__name__))
        name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        if tokenizer is None and needs_tokenizer:
            if not getattr(config, "_name_or_path", ""):
                raise ValueError("probe_pretrained: pass tokenizer= (or token ids) for a model without a name_or_path")
            tokenizer = config._name_or_path
    else:
        name = os.fspath(model_or_path)
        model, loaded_tokenizer, model_type = load_pretrained(
            model_or_path,
            tokenizer=tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None,
            dtype=options.dtype,
            device=options.device,
            trust_remote_code=options.trust_remote_code,
            device_map=options.device_map,
            max_memory=options.memory_map,
            offload_folder=options.offload_folder,
        )
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = loaded_tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(
            tokenizer,
            local_files_only=hf_offline_mode(),
            trust_remote_code=options.trust_remote_code,
            hint="pass tokenizer= (a tokenizer object or a directory with one) or token ids",
        )
    return LoadedModel(model, tokenizer, name, model_type)
