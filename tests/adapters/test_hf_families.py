"""Every MoE family of the family table (docs/hf-families.md) that uses the experts interface, each as a tiny random
model of the installed transformers built once for the module.

The table belongs to the transformers of the lock (constraints.txt): with that version installed the suite checks
that the table lists exactly the families transformers has and that it is the generated one. With another version
(``make test-latest``) it checks the table's families only; the families that version adds are reported by
scripts/hf_family_coverage.py, never failed here.

The references are the model's own: the classes its modeling source decorates with ``@use_experts_implementation``
(read as text, not through the adapter's structural test), the ``(top_k_index, top_k_weights)`` every block passes
to its experts module and the block's output during a forward of the whole model (forward hooks), the experts
module itself called with every token routed to one expert, ``torch.func`` Jacobians, and a ``Trainer`` run that
logs to a ``CSVLogger``.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``D`` model dim.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")

from helpers import fit_logged, load_script  # noqa: E402

from moe_lightning.adapters import BlockNotViewable, find_moe_layers, scan_moe_layers  # noqa: E402
from moe_lightning.adapters.hf_experts import experts_interface_views  # noqa: E402
from moe_lightning.adapters.hf_experts_views import ExpertsInterfaceView  # noqa: E402
from moe_lightning.adapters.hf_families import (  # noqa: E402
    coverage_table,
    experts_families,
    family_coverage,
    tiny_model,
)
from moe_lightning.callbacks import GeometryMonitor, RouterMonitor  # noqa: E402
from moe_lightning.geometry import ProbeConfig, probe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TABLE_SCRIPT = load_script(ROOT / "scripts" / "hf_families_table.py")
PAGE = (ROOT / "docs" / "hf-families.md").read_text(encoding="utf-8")
TABLE = TABLE_SCRIPT.parse_table(TABLE_SCRIPT.committed_table(PAGE))
# the table's families that the installed transformers has: exactly the table's with the locked version installed
FAMILIES = [f for f in experts_families() if f in TABLE.families]
NOT_COVERED = sorted(f for f in TABLE.not_covered if f in FAMILIES)
TABLE_VERSION_INSTALLED = transformers.__version__ == TABLE.version
NOT_THE_TABLE_VERSION = (
    f"the table is generated from transformers {TABLE.version}, {transformers.__version__} is installed: "
    "scripts/hf_family_coverage.py reports how their families differ"
)
# the families the issue names, which a Trainer runs in the default suite (all covered families under -m slow)
TRAINER_FAMILIES = ["deepseek_v3", "gpt_oss", "qwen3_next"]
DECORATED = re.compile(r"^@use_experts_implementation\b[^\n]*\n(?:@[^\n]*\n)*class (\w+)", re.MULTILINE)


def decorated_classes(module: str) -> set[str]:
    """Class names the modeling source of ``transformers.models.<module>`` decorates with the experts interface."""
    path = Path(transformers.models.__file__).parent / module / f"modeling_{module}.py"
    return set(DECORATED.findall(path.read_text())) if path.is_file() else set()


def experts_modules(family: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's modules that are instances of a decorated class, or of a subclass of one (Ergo's experts add a
    norm per expert around the decorated projections)."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = tuple(getattr(modeling, name) for name in decorated_classes(family))
    return {n: m for n, m in model.named_modules() if isinstance(m, classes)}


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module | Exception]:
    """Each family's tiny model, built once (or the error that stopped it)."""
    models: dict[str, torch.nn.Module | Exception] = {}
    for family in FAMILIES:
        try:
            models[family] = tiny_model(family)
        except Exception as error:  # noqa: BLE001 - a family that does not build is an entry of the table
            models[family] = error
    return models


@pytest.fixture(scope="module")
def coverage(tiny_models) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f: family_coverage(f, None if isinstance(m, Exception) else m) for f, m in tiny_models.items()}


@pytest.fixture(scope="module")
def views(coverage) -> dict[str, list]:
    """Each built family's views, as its coverage found them."""
    return {f: c.scan.views for f, c in coverage.items() if c.scan is not None}


def run_with_hooks(model: torch.nn.Module, experts: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """One forward of the whole model on random token ids; per block (the experts' parent): its input and output,
    and what it passed to its experts."""
    captured: dict[str, dict] = {}
    handles = []
    for name, module in experts.items():
        block_name = name.rsplit(".", 1)[0]
        record = captured.setdefault(block_name, {})

        def experts_hook(m, args, kwargs, output, record=record):
            values = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights")]
            record["routing"] = [v for v in values if v is not None][1:3]

        def block_hook(m, args, kwargs, output, record=record):
            x = args[0] if args else kwargs["hidden_states"]
            y = output if isinstance(output, torch.Tensor) else output[0]
            record["x"], record["y"] = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])

        handles.append(module.register_forward_hook(experts_hook, with_kwargs=True))
        handles.append(model.get_submodule(block_name).register_forward_hook(block_hook, with_kwargs=True))
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def check_family(family: str, model: torch.nn.Module | Exception, views: list | None) -> str | None:
    """None when the family's views agree with its model; otherwise what failed."""
    if isinstance(model, Exception):
        return f"does not build: {model}"
    experts = experts_modules(family, model)
    if not experts:
        return "no experts module in the tiny model"
    try:
        captured = run_with_hooks(model, experts)
    except Exception as error:  # noqa: BLE001
        return f"does not run: {type(error).__name__}: {error}"
    if views is None:
        return "its coverage found no views"
    found = {v.name for v in views if isinstance(v, ExpertsInterfaceView)}
    if found != set(captured):
        return f"blocks found {sorted(found)}, expected {sorted(captured)}"
    for block_name, record in captured.items():
        block_views = [v for v in views if v.module is model.get_submodule(block_name)]
        routed = next(v for v in block_views if v.name == block_name)
        x_ND, (index_NK, weights_NK) = record["x"], record["routing"]
        with torch.no_grad():
            gates_NE = routed.gates(x_ND)
            own_NE = torch.zeros_like(gates_NE).scatter(-1, index_NK.long(), weights_NK.to(gates_NE.dtype))
            if not torch.equal(gates_NE != 0, own_NE != 0):
                return f"{block_name}: other experts than the model's"
            if not torch.allclose(gates_NE, own_NE * routed.output_scale, rtol=1e-6, atol=1e-7):
                return f"{block_name}: other weights than the model's"
            experts_module = routed.experts
            for e in range(2):  # the expert function against the experts module with every token sent to e
                sent = experts_module(
                    x_ND, torch.full((x_ND.shape[0], 1), e), torch.ones(x_ND.shape[0], 1, dtype=x_ND.dtype)
                )
                if not torch.allclose(routed.expert(e)(x_ND), sent, rtol=1e-4, atol=1e-5 * float(sent.abs().max())):
                    return f"{block_name}: expert {e} differs from the experts module"
            recon_ND = sum(
                v.gates(x_ND)[:, e : e + 1] * v.expert(e)(x_ND) for v in block_views for e in range(v.num_experts)
            )
        scale = float(record["y"].abs().max())
        if scale == 0 or not torch.allclose(recon_ND, record["y"], rtol=1e-4, atol=1e-5 * scale):
            return f"{block_name}: the views do not reconstruct the block output"
    return None


def test_families_are_enumerated_from_the_installed_transformers() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    modules = {model_type_to_module_name(t) for t in CONFIG_MAPPING_NAMES}
    reference = {m for m in modules if decorated_classes(m)}
    assert set(experts_families()) == reference
    for family, info in experts_families().items():
        assert set(info.experts_classes) == decorated_classes(family)
        assert all(model_type_to_module_name(t) == family for t in info.model_types)
    assert len(reference) >= 30


def test_the_table_is_generated_from_the_locked_transformers() -> None:
    locked = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(encoding="utf-8"), re.M)
    assert locked is not None, "constraints.txt pins no transformers"
    assert TABLE.version == locked[1], "after make lock, regenerate the table: python scripts/hf_families_table.py"


def test_the_table_lists_every_family_of_its_transformers() -> None:
    if not TABLE_VERSION_INSTALLED:
        pytest.skip(NOT_THE_TABLE_VERSION)
    assert TABLE.families == set(experts_families())
    assert not TABLE.covered & set(TABLE.not_covered)


@pytest.mark.integration  # a tiny model of every family in the installed transformers
def test_every_family_against_its_model(tiny_models, views, coverage) -> None:
    failed = {f: r for f, m in tiny_models.items() if (r := check_family(f, m, views.get(f))) is not None}
    covered = [f for f in FAMILIES if f not in failed]
    assert len(covered) >= 30, failed
    # the table lists exactly the families that fail, and the adapter's own coverage agrees with the model's checks
    assert set(failed) == set(NOT_COVERED), {f: failed.get(f, "passes") for f in set(failed) ^ set(NOT_COVERED)}
    assert {f for f, c in coverage.items() if not c.covered} == set(failed)


@pytest.mark.integration  # the same tiny model of every family
def test_docs_table_is_the_generated_one(coverage) -> None:
    if not TABLE_VERSION_INSTALLED:
        pytest.skip(NOT_THE_TABLE_VERSION)
    generated = coverage_table(list(coverage.values()))
    assert TABLE_SCRIPT.committed_table(PAGE) == generated
    parsed = TABLE_SCRIPT.parse_table(generated)  # what the suite and the report read back from the table
    assert parsed.version == transformers.__version__
    assert parsed.covered == {f for f, c in coverage.items() if c.covered}
    assert parsed.not_covered == {f: c.reason for f, c in coverage.items() if not c.covered}


def test_families_beyond_the_table_are_reported_not_failed(coverage, capsys) -> None:
    # a table without two families of the installed transformers, one covered and one not, as a newer transformers
    # with families of its own would find it
    page = "".join(
        line for line in PAGE.splitlines(keepends=True) if not line.startswith(("| `mixtral` |", "| `deepseek_v4` |"))
    )
    report_script = load_script(ROOT / "scripts" / "hf_family_coverage.py")
    text = report_script.report(page)
    beyond = set(experts_families()) - TABLE.families | {"mixtral", "deepseek_v4"}
    assert f"\n{len(beyond)} families the table does not list (reported, not tested):\n" in text
    assert f"  mixtral: covered: MixtralForCausalLM, {len(coverage['mixtral'].views)} MoE views" in text
    assert f"  deepseek_v4: not covered: {coverage['deepseek_v4'].reason}" in text
    gone = sorted(TABLE.families - set(experts_families()))
    assert ("In the table but not in the installed transformers: " + ", ".join(gone) in text) == bool(gone)
    assert report_script.main([]) == 0  # the committed page, as make test-latest reports it: never a failure
    printed = capsys.readouterr().out
    assert ("No family beyond the table." in printed) == (set(experts_families()) <= TABLE.families)


def plain_swiglu(experts: torch.nn.Module) -> bool:
    """The default gate of the interface on SiLU, no biases, no post norm, by transformers' own objects."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    return (
        type(experts)._apply_gate is _default_apply_gate
        and isinstance(experts.act_fn, (SiLUActivation, torch.nn.SiLU))
        and experts.has_gate
        and not experts.has_bias
        and not experts.has_post_expert_norm
    )


@pytest.mark.integration  # every family's views
def test_closed_form_jacobians_for_every_plain_swiglu_family(views, coverage, monkeypatch) -> None:
    jacobians_module = importlib.import_module("moe_lightning.geometry.jacobians")  # the package exports a function

    torch_func = jacobians_module.jacobians
    reference: dict[tuple[str, int], torch.Tensor] = {}
    swiglu_families = []
    for family, c in coverage.items():
        if not c.covered:
            continue
        view = next(v for v in views[family] if isinstance(v, ExpertsInterfaceView))
        assert view.closed_form == plain_swiglu(view.experts), family
        assert (c.jacobian == "closed form") == view.closed_form
        if not view.closed_form:
            assert view.expert_jacobian(0, torch.zeros(1, 32)) is None
            continue
        swiglu_families.append(family)
        x_ND = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference[(family, 0)] = torch_func(view.expert(0), x_ND)
            torch.testing.assert_close(view.expert_jacobian(0, x_ND), reference[(family, 0)], rtol=1e-5, atol=1e-6)
    assert len(swiglu_families) >= 30

    def no_torch_func(fn, x_ND, **kwargs):
        if x_ND.shape[0]:  # an expert that saw no token has nothing to differentiate
            raise AssertionError("torch.func Jacobians were used")
        return torch_func(fn, x_ND, **kwargs)

    monkeypatch.setattr(jacobians_module, "jacobians", no_torch_func)
    cfg = ProbeConfig(jacobian_method="closed_form", layer_jacobian=False, pca=False, alignment=False, subspaces=False)
    for family in swiglu_families:
        view = next(v for v in views[family] if isinstance(v, ExpertsInterfaceView))
        report = probe(view, torch.randn(16, 32, generator=torch.Generator().manual_seed(2)), cfg)
        assert torch.isfinite(report.expert["jac_sigma_max"][report.tokens > 0]).all(), family


def test_torch_func_layer_jacobian_through_block_mode_gates() -> None:
    # MiniMax-M2's router needs more than the tokens, so its gates come from the block's own forward, intercepted
    # at the experts call; they stay differentiable: vmap(jacrev) through the view equals autograd of the block
    (view, *_) = find_moe_layers(tiny_model("minimax_m2", initializer_range=0.3))  # O(1) Jacobians
    assert view.mode == "block"
    x_ND = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))

    def layer(x_D):
        return sum(view.gates(x_D[None])[0, e] * view.expert(e)(x_D[None])[0] for e in range(view.num_experts))

    jac_NDD = torch.func.vmap(torch.func.jacrev(layer))(x_ND)
    for n in range(3):
        ref_DD = torch.autograd.functional.jacobian(lambda x: view.module(x.view(1, 1, -1)).reshape(-1), x_ND[n])
        assert ref_DD.abs().max() > 0.1
        torch.testing.assert_close(jac_NDD[n], ref_DD, rtol=1e-5, atol=1e-5)


def test_a_block_that_fails_the_self_check_is_reported() -> None:
    block = tiny_model("deepseek_v3").model.layers[0].mlp
    block.forward = functools.partial(lambda forward, h: 1.5 * forward(h), block.forward)  # not Σ g·f any more
    try:
        with pytest.raises(BlockNotViewable, match=r"is not Σ gates·experts plus shared experts.*off by"):
            experts_interface_views("model.layers.0.mlp", block)
    finally:
        del block.forward
    assert len(experts_interface_views("model.layers.0.mlp", block)) == 2  # the block as it was: viewed again
    # a block whose forward takes more than its hidden states (DeepSeek-V4 routes by token id)
    model = tiny_model("deepseek_v4")
    scan = scan_moe_layers(model)
    assert scan.skipped and all(s.class_name == "DeepseekV4SparseMoeBlock" for s in scan.skipped)
    assert [s.name for s in scan.skipped] == [
        n for n, m in model.named_modules() if type(m).__name__ == "DeepseekV4SparseMoeBlock"
    ]
    with pytest.warns(UserWarning, match=r"DeepseekV4SparseMoeBlock\): its forward takes inputs besides the hidden"):
        find_moe_layers(model, layers="model.layers.0.mlp")  # a message of its own: each is warned once


class CausalLM(L.LightningModule):
    """The minimal LightningModule a user writes around a Hugging Face model: next-token loss (or, for a base
    model, any loss of its hidden states)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        out = self(input_ids)
        if getattr(out, "logits", None) is not None:
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
        else:
            loss = out.last_hidden_state.float().square().mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_and_check(family: str, tmp_path: Path) -> None:
    model = tiny_model(family, seed=1).train()  # a fresh model (the fit changes its weights), in training mode
    # A DeepSeek-V3-style gate's aux-free bias, which the model's own training code would move: set by hand here
    biases = {}
    for name, module in model.named_modules():
        bias = getattr(getattr(module, "gate", None), "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.linspace(-0.5, 0.25, bias.numel()).to(bias))
            biases[name] = bias
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(3, vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    geometry = GeometryMonitor(  # the Jacobian spectra only: the other quantities have tests of their own
        every_n_steps=1,
        max_tokens=16,
        layer_jacobian=False,
        pca=False,
        alignment=False,
        subspaces=False,
        dtype="float32",
        source="train",
        log_media=False,
        save_reports=False,
    )
    data = DataLoader(TensorDataset(tokens), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = fit_logged(CausalLM(model), data, tmp_path, [geometry, RouterMonitor(log_every_n_steps=1)], 2)
    names = [v.name for v in find_moe_layers(model)]
    assert names and [v.name for v in geometry.views] == names
    for name in names:
        key = f"geometry/{name}/jac_sigma_max/mean"
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (family, name, values)
        view = next(v for v in geometry.views if v.name == name)
        if view.num_experts > 1:
            loads = [r for r in rows if r.get(f"router/{name}/load/e0")]
            assert loads, (family, name)
            total = sum(float(loads[0][f"router/{name}/load/e{e}"]) for e in range(view.num_experts))
            assert total == pytest.approx(1.0)
    for name, bias in biases.items():  # a bias nothing changes during the fit: its range, and no change
        assert [float(r[f"router/{name}/bias_range"]) for r in rows if r.get(f"router/{name}/bias_range")] == (
            pytest.approx([float(bias.max() - bias.min())] * 2)
        ), name
        assert all(float(r[f"router/{name}/bias_change"]) == 0 for r in rows if r.get(f"router/{name}/bias_change"))
    assert biases or family != "deepseek_v3"


@pytest.mark.integration  # a fit of each family (tests/callbacks/test_hf_models.py fits one in the quick tier)
@pytest.mark.parametrize("family", TRAINER_FAMILIES)
def test_trainer_logs_geometry_for_every_moe_layer(family, tmp_path) -> None:
    fit_and_check(family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TRAINER_FAMILIES + NOT_COVERED])
def test_trainer_logs_geometry_for_every_moe_layer_of_every_family(family, tmp_path) -> None:
    fit_and_check(family, tmp_path)


def test_bfloat16_experts_with_a_float32_router() -> None:
    # a checkpoint loaded in bfloat16 that keeps its router in float32: the self-check runs in the experts' dtype
    model = tiny_model("deepseek_v3", initializer_range=0.2).to(torch.bfloat16)
    for layer in model.model.layers:
        layer.mlp.gate.float()
    scan = scan_moe_layers(model)
    assert not scan.skipped and len(scan.views) == 4
    block = scan.views[0].module
    x_ND = torch.randn(6, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        y_ND = block(x_ND[None])[0].float()
        recon_ND = sum(
            v.gates(x_ND)[:, e : e + 1].float() * v.expert(e)(x_ND).float()
            for v in scan.views[:2]
            for e in range(v.num_experts)
        )
    torch.testing.assert_close(recon_ND, y_ND, rtol=3e-2, atol=3e-2 * float(y_ND.abs().max()))


def test_a_router_that_routes_in_float32_is_checked_and_probed_in_float64() -> None:
    # Inkling2's router casts its input to float32 and multiplies by its own weight; the probe lends the router
    # float64 weights, so the view runs that router on float32 copies, as the model runs it.
    if "inkling2" not in FAMILIES:
        pytest.skip("the installed transformers has no inkling2 family")
    from moe_lightning.geometry import verify_view

    model = tiny_model("inkling2", seed=1)
    views = find_moe_layers(model)
    x_ND = torch.randn(12, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    check = verify_view([v for v in views if v.module is views[0].module], x_ND, torch.float64)
    assert check.passed and check.miss < 1e-5, check.message()
    report = probe(views[0], x_ND.double(), ProbeConfig(pca=False, alignment=False, subspaces=False))
    assert math.isfinite(report.scalars("g")["g/jac_sigma_max/mean"])
