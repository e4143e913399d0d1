"""The layers of the house, as docs/design.md draws them, match the imports: a module imports only modules of its
own layer or of a layer below, and the pure-torch layers never import Lightning."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_lightning"
# The layers the diagram marks as pure torch: usable and testable without a Trainer.
NO_LIGHTNING = ("lightning", "pytorch_lightning")


def diagram_layers() -> dict[str, int]:
    """``unit -> layer`` from the ``layer N  unit, unit  description`` lines of docs/design.md's diagram."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"```text\n(layer \d.*?)```", text, flags=re.DOTALL)
    assert block, "docs/design.md has no layer diagram (a ```text block of 'layer N  units  description' lines)"
    layers = {}
    for line in block.group(1).splitlines():
        match = re.match(r"layer (\d+)\s+([\w, ]+?)\s{2,}", line)
        if match:
            for unit in match.group(2).split(","):
                layers[unit.strip()] = int(match.group(1))
    return layers


def unit_of(module: str) -> str:
    """``moe_lightning.geometry.probe`` -> ``geometry``; ``moe_lightning.cli`` -> ``cli``."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_every_unit_of_the_package_is_in_the_diagram():
    layers = diagram_layers()
    units = {unit_of(name) for name in modules() if name != "moe_lightning"}
    assert units <= set(layers), f"not in docs/design.md's diagram: {sorted(units - set(layers))}"
    assert set(layers) <= units, f"the diagram names units the package lacks: {sorted(set(layers) - units)}"


def test_imports_point_down_the_layers():
    layers = diagram_layers()
    upward = []
    for name, path in modules().items():
        if name == "moe_lightning":
            continue
        unit = unit_of(name)
        for imported in imports_of(path):
            if imported.startswith("moe_lightning.") and layers[unit_of(imported)] > layers[unit]:
                upward.append(f"{name} (layer {layers[unit]}) imports {imported} (layer {layers[unit_of(imported)]})")
    assert not upward, "\n".join(upward)


def test_pure_torch_layers_never_import_lightning():
    layers = diagram_layers()
    pure = {unit for unit, layer in layers.items() if layer <= layers["adapters"]}
    assert {"common", "moe", "models", "geometry", "adapters"} <= pure
    offenders = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        if name != "moe_lightning" and unit_of(name) in pure
        for imported in imports_of(path)
        if imported.split(".")[0] in NO_LIGHTNING
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checks_catch_an_upward_import(tmp_path):
    """The parser sees an import made inside a function, the kind that hides a cycle."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from moe_lightning.callbacks import GeometryMonitor\n    import lightning\n")
    assert imports_of(source) == {"moe_lightning.callbacks", "lightning"}
    assert diagram_layers()["callbacks"] > diagram_layers()["geometry"]


def test_callbacks_see_a_model_only_through_its_views():
    """Callbacks never import the model code: layers reach them as MoEViews, expert placement through a view's
    ``placement()``. The one model-side name they read is the ``MoEAux`` record our layers return."""
    offenders = []
    for name, path in modules().items():
        if not name.startswith("moe_lightning.callbacks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("moe_lightning.moe", "moe_lightning.models"):
                names = {alias.name for alias in node.names}
                if node.module == "moe_lightning.models" or names - {"MoEAux"}:
                    offenders.append(f"{name} imports {sorted(names)} from {node.module}")
            elif isinstance(node, ast.Import) and any(
                a.name in ("moe_lightning.moe", "moe_lightning.models") for a in node.names
            ):
                offenders.append(f"{name} imports the model code")
    assert not offenders, "\n".join(offenders)


def test_the_top_level_names_are_the_ones_they_stand_for():
    """The package's small top level is lazy: each name resolves to the object of its home module."""
    import moe_lightning
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
    from moe_lightning.geometry import probe
    from moe_lightning.moe import MoEConfig, MoELayer

    homes = [CurvatureMonitor, GeometryMonitor, MoEConfig, MoELayer, RouterMonitor, find_moe_layers, probe]
    assert [getattr(moe_lightning, obj.__name__) for obj in homes] == homes
    assert sorted(moe_lightning.__all__) == sorted([obj.__name__ for obj in homes] + ["__version__"])


def test_the_old_module_path_of_the_lightning_modules_loads_with_a_warning_naming_the_new_one():
    import warnings

    import moe_lightning.lit as old
    from moe_lightning import modules

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = old.MLPMoEModule
    assert found is modules.MLPMoEModule
    (warning,) = caught
    assert warning.category is FutureWarning and "use moe_lightning.modules.MLPMoEModule" in str(warning.message)
