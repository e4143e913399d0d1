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
    """``moe_lightning.geometry.probe`` -> ``geometry``; ``moe_lightning.commands`` -> ``cli``."""
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


def test_every_unit_is_a_folder():
    """The tree is the diagram: the top of the package holds only its ``__init__`` and ``__main__``."""
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not flat, f"modules outside the layer folders: {flat}"
    assert {unit for unit in diagram_layers() if unit != "__main__"} <= {
        p.name for p in PACKAGE.iterdir() if p.is_dir()
    }


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
    assert {"common", "nn", "distributed", "geometry", "adapters", "analysis", "report"} <= pure
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


def model_code_imports(path: Path) -> list[str]:
    """What ``path`` imports from the model code (``moe_lightning.nn``), other than the ``MoEAux`` record."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_lightning.nn"):
            names = {alias.name for alias in node.names} - {"MoEAux"}
            found += [f"{name} from {node.module}" for name in sorted(names)]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "moe_lightning"
            and any(alias.name == "nn" for alias in node.names)
        ):
            found.append("moe_lightning.nn")
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("moe_lightning.nn")]
    return found


def test_callbacks_see_a_model_only_through_its_views():
    """Callbacks never import the model code: layers reach them as MoEViews, expert placement through a view's
    ``placement()``. The one model-side name they read is the ``MoEAux`` record our layers return."""
    offenders = [
        f"{name} imports {what}"
        for name, path in modules().items()
        if name.startswith("moe_lightning.callbacks")
        for what in model_code_imports(path)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_model_code_check_catches_each_spelling(tmp_path):
    source = tmp_path / "monitor.py"
    source.write_text(
        "from moe_lightning.nn.layer import MoEAux, MoELayer\n"
        "from moe_lightning import nn\n"
        "import moe_lightning.nn.models\n"
    )
    assert model_code_imports(source) == [
        "MoELayer from moe_lightning.nn.layer",
        "moe_lightning.nn",
        "moe_lightning.nn.models",
    ]


def test_the_top_level_names_are_the_ones_they_stand_for():
    """The package's small top level is lazy: each name resolves to the object of its home module."""
    import moe_lightning
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor, WeightSpectraMonitor
    from moe_lightning.geometry import probe
    from moe_lightning.nn import MoEConfig, MoELayer

    homes = [CurvatureMonitor, GeometryMonitor, MoEConfig, MoELayer, RouterMonitor, WeightSpectraMonitor]
    homes += [find_moe_layers, probe]
    assert [getattr(moe_lightning, obj.__name__) for obj in homes] == homes
    assert sorted(moe_lightning.__all__) == sorted([obj.__name__ for obj in homes] + ["__version__"])
