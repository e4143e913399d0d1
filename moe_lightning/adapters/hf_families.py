"""The Hugging Face model families whose MoE blocks use the transformers experts interface, read from the installed
``transformers`` itself, and tiny random configs of them for tests and docs.

A family is a ``transformers.models.<module>`` package whose modeling code defines an experts class wrapped by
``transformers.integrations.moe.use_experts_implementation``: the class is recognised by structure (its
``forward`` is the interface's dispatching wrapper and it has the interface's ``_apply_gate``), never by name. Its
model types are the ``config.model_type`` values the auto mappings send to that package.

:func:`tiny_config` shrinks a family's default config by the config's own attribute names (width, layers, heads,
experts, vocabulary), keeping one layer of each kind where the config lists per-layer kinds (hybrid attention, dense
and sparse MLPs, layers that read another layer's keys and values) and renumbering the layer indices it lists, so a
random model of it builds and runs in milliseconds on a CPU. A few families also need a value their default config
leaves to the checkpoint, or one their config's validation demands (``_FAMILY_SETTINGS``, each with its reason).

Everything here imports ``transformers`` lazily: the package itself never needs it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from moe_lightning.adapters.registry import LayerScan, scan_moe_layers

__all__ = [
    "ExpertsFamily",
    "FamilyCoverage",
    "coverage_table",
    "family_coverage",
    "experts_families",
    "family_model_class",
    "is_experts_interface_class",
    "supported_model_types",
    "tiny_config",
    "tiny_model",
]


def is_experts_interface_class(cls: Any) -> bool:
    """Whether ``cls`` is an experts class of the transformers experts interface: an ``nn.Module`` subclass whose
    ``forward`` is the dispatcher ``use_experts_implementation`` installs and that has its ``_apply_gate``."""
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)) or not hasattr(cls, "_apply_gate"):
        return False
    code = getattr(cls.forward, "__code__", None)
    return code is not None and "use_experts_implementation" in code.co_qualname


@dataclass(frozen=True)
class ExpertsFamily:
    """One ``transformers.models`` package that uses the experts interface.

    Attributes:
        module: the package name under ``transformers.models`` (``"deepseek_v3"``).
        model_types: the ``config.model_type`` values the auto mappings send to it.
        experts_classes: names of its experts-interface classes.
    """

    module: str
    model_types: tuple[str, ...]
    experts_classes: tuple[str, ...]


@functools.cache
def experts_families() -> dict[str, ExpertsFamily]:
    """Every family of the installed ``transformers`` whose modeling code uses the experts interface, by module.

    Walks the auto config mapping (model type -> package), imports each package's ``modeling_<module>.py`` whose
    source mentions the interface, and keeps those that define an experts-interface class.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.models.__file__).parent
    types_by_module: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        types_by_module.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    families: dict[str, ExpertsFamily] = {}
    for module, model_types in sorted(types_by_module.items()):
        source = root / module / f"modeling_{module}.py"
        if "." in module or not source.is_file() or "use_experts_implementation" not in source.read_text():
            continue
        try:
            modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except Exception:  # noqa: BLE001 - a package that cannot be imported here offers no model to read
            continue
        classes = tuple(
            name
            for name, obj in vars(modeling).items()
            if is_experts_interface_class(obj) and obj.__module__ == modeling.__name__
        )
        if classes:
            families[module] = ExpertsFamily(module, tuple(model_types), classes)
    return families


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values whose models are built from experts-interface MoE blocks, sorted."""
    return sorted({t for family in experts_families().values() for t in family.model_types})


def _has_subconfigs(config: Any) -> bool:
    from transformers import PretrainedConfig

    return any(isinstance(v, PretrainedConfig) for v in vars(config).values())


def family_model_class(family: str) -> tuple[str, type[nn.Module]]:
    """``(model_type, model class)`` to build a family's language model from: among its model types with a causal-LM
    class (else a base model class), one with a plain (not composite) config first.

    Raises:
        ValueError: ``family`` is not an experts-interface family, or none of its model types has a model class.
    """
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    families = experts_families()
    if family not in families:
        raise ValueError(f"family={family!r} does not use the experts interface; allowed: {', '.join(families)}")
    candidates = []
    for model_type in families[family].model_types:
        composite = _has_subconfigs(CONFIG_MAPPING[model_type]())
        for rank, mapping in enumerate(
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES)
        ):
            name = mapping.get(model_type)
            if isinstance(name, str) and hasattr(transformers, name):
                candidates.append(((rank, composite), model_type, getattr(transformers, name)))
    if not candidates:
        raise ValueError(f"family {family!r}: none of its model types {families[family].model_types} has a model class")
    _, model_type, cls = min(candidates, key=lambda c: c[0])
    return model_type, cls


_TOP_K_PATTERN = r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k)$"
_TOP_K = re.compile(_TOP_K_PATTERN)
_SHRINK_RULES_TOP_K = 2
# (attribute-name pattern, tiny value): integer config attributes above the value are shrunk to it. Patterns are
# matched in order against each attribute name of the config (and of its sub-configs).
_SHRINK_RULES: tuple[tuple[str, int], ...] = (
    (r"vocab_size$", 96),
    (r"^(num_hidden_layers|num_layers|n_layers?)$", 2),
    (r"intermediate_size$", 32),
    (r"(^|_)hidden_size$|^d_model$", 32),
    (r"^(num_attention_heads|n_head)$|(^|_)(num_heads|n_heads)$", 4),
    (r"head_dim$", 8),
    (r"^(num_experts|n_routed_experts|num_local_experts|moe_num_experts|num_routed_experts)$", 8),
    (_TOP_K_PATTERN, _SHRINK_RULES_TOP_K),
    (r"^n_group$", 2),
    (r"^topk_group$", 1),
    (r"lora_rank$", 16),
    (r"^(first_k_dense_replace|first_dense_layers|num_dense_layers)$", 0),
)
_KV_HEADS = re.compile(r"^(num_key_value_heads|num_kv_heads)$")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Attributes whose values are layer indices of the full model: the layers that have a property (dense MLPs, key
# indexers), and per layer the layer whose keys and values it reads. They are renumbered for the kept layers.
_LAYER_SETS = re.compile(r"^(mlp_only_layers|index_layers)$")
_LAYER_SOURCES = re.compile(r"^kv_source_layers$")
# Values a family's default config leaves to its checkpoints, or that its config's validation demands beyond the
# shrinking above, by family (a nested dict for a sub-config).
_FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    # Kolibri1_1Config: "NVFP4 rounding of keys and values needs a `head_dim` that is a multiple of 16"
    "kolibri1_1": {"head_dim": 16},
    # the text model builds a sliding-window mask for any layout, and the default config leaves the window unset
    # (None); every layer of the default layout attends to the whole context, so any window serves
    "step3p7": {"text_config": {"sliding_window": 512}},
}


def _per_layer_lists(values: dict[str, Any], num_layers: int) -> dict[str, list]:
    return {k: v for k, v in values.items() if isinstance(v, (list, tuple)) and len(v) == num_layers > 0}


def _layer_sets(values: dict[str, Any]) -> dict[str, list[int]]:
    return {
        k: v
        for k, v in values.items()
        if _LAYER_SETS.match(k) and isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v)
    }


def _kept_layers(values: dict[str, Any], lists: dict[str, list], num_layers: int, tiny_layers: int) -> list[int]:
    """Layer indices that keep one layer of every combination of per-layer kinds (the per-layer lists of strings
    or flags, membership of each layer set, reading its own keys and values or another layer's), at least
    ``tiny_layers``, and every layer a kept one reads from."""
    kinds = [v for v in lists.values() if all(isinstance(item, (str, bool)) for item in v)]
    kinds += [[i in set(members) for i in range(num_layers)] for members in _layer_sets(values).values()]
    sources = [v for k, v in lists.items() if _LAYER_SOURCES.match(k)]
    kinds += [[source == i for i, source in enumerate(v)] for v in sources]
    keep, seen = [], set()
    for i in range(num_layers):
        kind = tuple(v[i] for v in kinds)
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    for i in range(num_layers):
        if len(keep) >= tiny_layers:
            break
        if i not in keep:
            keep.append(i)
    keep += [v[i] for v in sources for i in keep if v[i] not in keep]
    return sorted(set(keep))


def _shrunk(config_class: type, values: dict[str, Any], settings: dict[str, Any] | None = None) -> Any:
    """``config_class(**values)`` with ``values`` (a config's ``to_dict()``) shrunk by attribute names, then
    ``settings`` (nested dicts for sub-configs) applied."""
    from transformers import PretrainedConfig

    values, settings = dict(values), dict(settings or {})
    for key, value in list(values.items()):
        sub = getattr(config_class, "sub_configs", {}).get(key)
        if isinstance(value, dict) and sub is not None and isinstance(sub, type) and issubclass(sub, PretrainedConfig):
            values[key] = _shrunk(sub, value, settings.pop(key, None)).to_dict()
    heads_before = values.get("num_attention_heads")
    for key, value in list(values.items()):
        if value is None and _TOP_K.match(key):  # a family that leaves k to the checkpoint
            values[key] = _SHRINK_RULES_TOP_K
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        for pattern, tiny in _SHRINK_RULES:
            if re.search(pattern, key):
                values[key] = min(value, tiny)
                break
    if all(isinstance(values.get(k), int) for k in ("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim")):
        # multi-head latent attention: a query/key head is its part without and its part with rotary embeddings
        values["qk_head_dim"] = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
    heads = values.get("num_attention_heads")
    for key, value in list(values.items()):
        if _KV_HEADS.match(key) and isinstance(value, int) and isinstance(heads_before, int) and heads_before > 0:
            # keep the grouping: as many query heads per key/value head as the full model has, where it fits
            values[key] = max(1, heads // max(1, heads_before // max(1, value)))
    layers_key = next((k for k in ("num_hidden_layers", "num_layers", "n_layers") if k in values), None)
    if layers_key is not None:
        before = getattr(config_class(), layers_key, None)
        if isinstance(before, int) and before > values[layers_key]:
            lists = _per_layer_lists(values, before)
            if lists:
                keep = _kept_layers(values, lists, before, values[layers_key])
                for key, value in lists.items():
                    values[key] = type(value)(value[i] for i in keep)
                    if _LAYER_SOURCES.match(key):
                        values[key] = type(value)(keep.index(source) for source in values[key])
                for key, members in _layer_sets(values).items():
                    values[key] = type(members)(keep.index(i) for i in members if i in keep)
                values[layers_key] = len(keep)
    vocab = values.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_IDS:
            token = values.get(key)
            if isinstance(token, int) and token >= vocab:
                values[key] = min(2, vocab - 1)
            elif isinstance(token, list):
                values[key] = [min(t, vocab - 1) for t in token]
    values.pop("transformers_version", None)
    return config_class(**{**values, **settings})


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny version of ``family``'s default config (see the module docstring), with ``overrides`` applied last."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, _ = family_model_class(family)
    config_class = CONFIG_MAPPING[model_type]
    config = _shrunk(config_class, config_class().to_dict(), _FAMILY_SETTINGS.get(family))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random model of ``family`` built from :func:`tiny_config`, weights drawn after ``manual_seed(seed)``, in
    eval mode."""
    import torch

    _, model_class = family_model_class(family)
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return model_class(config).eval()


@dataclass(frozen=True)
class FamilyCoverage:
    """How the adapters read one family's tiny random model.

    Attributes:
        family: the ``transformers.models`` package.
        model_type: the model type its tiny model is built from.
        model_class: the class built.
        views: the view names found (empty when not covered).
        routing: how the gates are obtained, ``"router"`` and/or ``"block"`` (see ``ExpertsInterfaceView.mode``).
        jacobian: ``"closed form"`` for plain SwiGLU experts, ``"torch.func"`` otherwise.
        shared: the attribute names of the shared experts, ``"gated"`` marked.
        reason: why the family is not covered, one line; None when it is.
        scan: what ``scan_moe_layers`` found in the tiny model (None when it did not build or run).
    """

    family: str
    model_type: str
    model_class: str
    views: tuple[str, ...] = ()
    routing: str = ""
    jacobian: str = ""
    shared: str = ""
    reason: str | None = None
    scan: LayerScan | None = field(default=None, compare=False, repr=False)

    @property
    def covered(self) -> bool:
        return self.reason is None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 110 else text[:107] + "..."
    return f"{type(error).__name__}: {text}".replace("|", "/")


def family_coverage(family: str, model: nn.Module | None = None) -> FamilyCoverage:
    """Build ``family``'s tiny random model (or take ``model``), run it on random token ids, and find its MoE
    blocks; the result says what the views are, or why the family is not covered.

    A family is covered when the model builds and runs on the CPU, it has MoE blocks, and every one of them passes
    the adapter's reconstruction self-check.
    """
    import torch

    from moe_lightning.adapters.hf_experts import ExpertsInterfaceView, SharedExpertView

    try:
        model_type, model_class = family_model_class(family)
    except ValueError as error:
        return FamilyCoverage(family, "", "", reason=str(error))
    base = FamilyCoverage(family, model_type, model_class.__name__)
    try:
        model = tiny_model(family) if model is None else model
        vocab = int(model.config.get_text_config().vocab_size)
        tokens = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=tokens)
    except Exception as error:  # noqa: BLE001 - the reason is the table's entry for this family
        reason = f"its tiny config does not build or run on CPU ({_one_line(error)})"
        return replace(base, reason=reason)
    scan = scan_moe_layers(model)
    base = replace(base, scan=scan)
    if scan.skipped:
        first = scan.skipped[0]
        return replace(base, reason=f"{first.class_name} is not viewable: {first.reason.split(' (')[0]}")
    if not scan.views:
        return replace(base, reason="the tiny model has no MoE block")
    routed = [v for v in scan.views if isinstance(v, ExpertsInterfaceView)]
    shared = [v for v in scan.views if isinstance(v, SharedExpertView)]
    if not routed:
        return replace(base, reason="its MoE blocks are read by another adapter")
    shared_names = sorted({v.name.rsplit(".", 1)[-1] + (" (gated)" if v._gate_name else "") for v in shared})
    return replace(
        base,
        views=tuple(v.name for v in scan.views),
        routing=", ".join(sorted({v.mode for v in routed})),
        jacobian="closed form" if all(v.closed_form for v in routed) else "torch.func",
        shared=", ".join(shared_names),
    )


def coverage_table(coverage: list[FamilyCoverage]) -> str:
    """The Markdown tables of covered and not covered families, as the docs page shows them."""
    import transformers

    covered = [c for c in coverage if c.covered]
    missing = [c for c in coverage if not c.covered]
    lines = [
        f"Generated from transformers {transformers.__version__}: {len(covered)} of {len(coverage)} families that use "
        "the experts interface are covered.",
        "",
        "| family | model class | MoE views | gates from | expert Jacobians | shared experts |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| `{c.family}` | `{c.model_class}` | {len(c.views)} | {c.routing} | {c.jacobian} | {c.shared or '-'} |"
        for c in covered
    ]
    lines += ["", "Not covered:", "", "| family | model class | reason |", "|---|---|---|"]
    lines += [f"| `{c.family}` | `{c.model_class or '-'}` | {c.reason} |" for c in missing]
    return "\n".join(lines) + "\n"
