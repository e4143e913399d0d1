"""A sweep's preset: its fields and checks (:class:`Preset`), the arms it may list (:data:`ARMS`), and loading one
by name or path (:func:`load_preset`), its config paths resolved."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[3]
PRESET_DIR = PROJECT_ROOT / "configs" / "sweep"
#: Arm name -> the model config fields that make it (the sweep sets them in each job's config).
ARMS: dict[str, dict[str, str]] = {
    "topk": {"routing": "topk"},
    "soft": {"routing": "soft"},
    "dense_total": {"routing": "dense", "capacity_match": "total"},
    "dense_active": {"routing": "dense", "capacity_match": "active"},
}
#: Older arm names, still accepted: ``dense`` is ``dense_total`` (its jobs keep their ``dense-seed<k>`` names).
ARM_ALIASES: dict[str, str] = {"dense": "dense_total"}


@dataclass
class Preset:
    """A sweep preset (see the module docstring)."""

    name: str
    family: str
    configs: list[str]
    routings: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    routing_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def allowed_routings(self) -> tuple[str, ...]:
        """The arms, their aliases and the preset's variant names, what ``routings`` may list."""
        return (*ARMS, *ARM_ALIASES, *self.variants)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"sweep preset: name must be a non-empty string without '/', got {self.name!r}")
        if not self.configs:
            raise ValueError(f"sweep preset {self.name!r}: configs must list at least one LightningCLI config")
        self._check_variants()
        allowed = self.allowed_routings
        bad = [r for r in self.routings if r not in allowed]
        if bad or not self.routings:
            raise ValueError(
                f"sweep preset {self.name!r}: routings {self.routings!r} not allowed; choose from {allowed}"
            )
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"sweep preset {self.name!r}: seeds must be a non-empty list of ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.routings)) != len(self.routings):
            raise ValueError(f"sweep preset {self.name!r}: routings and seeds must not repeat")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"sweep preset {self.name!r}: overrides must be a mapping, got {type(self.overrides)}")
        if not isinstance(self.routing_overrides, dict) or any(
            r not in allowed or not isinstance(v, dict) for r, v in self.routing_overrides.items()
        ):
            raise ValueError(
                f"sweep preset {self.name!r}: routing_overrides must map routings {allowed} to config mappings, "
                f"got {self.routing_overrides!r}"
            )

    def _check_variants(self) -> None:
        if not isinstance(self.variants, dict):
            raise ValueError(f"sweep preset {self.name!r}: variants must be a mapping, got {type(self.variants)}")
        for name, variant in self.variants.items():
            builtin = (*ARMS, *ARM_ALIASES)
            if name in builtin or not isinstance(name, str) or not name or "/" in name or "-seed" in name:
                raise ValueError(
                    f"sweep preset {self.name!r}: variant name {name!r} must be a new name (not one of {builtin}), "
                    "without '/' or '-seed'"
                )
            if not isinstance(variant, dict) or set(variant) - {"configs", "overrides"}:
                raise ValueError(
                    f"sweep preset {self.name!r}: variant {name!r} must be a mapping with keys 'configs' and/or "
                    f"'overrides', got {variant!r}"
                )
            if not isinstance(variant.get("configs", []), list) or not isinstance(variant.get("overrides", {}), dict):
                raise ValueError(
                    f"sweep preset {self.name!r}: variant {name!r}: configs must be a list, overrides a mapping"
                )


def available_presets() -> list[str]:
    """Names of the presets shipped in ``configs/sweep/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_config_path(path: str) -> str:
    """A preset's config path: as given if it exists (relative to the working directory), else relative to the
    project root (so the shipped presets work from any directory)."""
    if Path(path).is_file():
        return str(Path(path).resolve())
    candidate = PROJECT_ROOT / path
    if candidate.is_file():
        return str(candidate)
    raise ValueError(f"sweep preset: config {path!r} does not exist (looked in {os.getcwd()} and {PROJECT_ROOT})")


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name (``mlp_small``) or a preset YAML file by path.

    Raises:
        ValueError: unknown name, missing file, or invalid fields; the message lists the shipped presets.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown sweep preset {name_or_path!r}: neither a file nor a shipped preset; "
            f"shipped presets: {', '.join(available_presets())}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    allowed = set(Preset.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"sweep preset {str(path)!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = {"name", "family", "configs"} - set(data)
    if missing:
        raise ValueError(f"sweep preset {str(path)!r}: missing keys {sorted(missing)}")
    preset = Preset(**data)
    preset.configs = [_resolve_config_path(c) for c in preset.configs]
    for variant in preset.variants.values():
        variant["configs"] = [_resolve_config_path(c) for c in variant.get("configs", [])]
    return preset
