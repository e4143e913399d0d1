"""Hugging Face views that cast what they read (``CastsOnRead``): a float64 probe of a float32 model lends no float64
copy of the stacked expert weights, gives the report of the probe that lends the whole block a float64 copy, and
leaves every parameter of the model as it was (docs/design.md, the MoEView contract).

The reference is the probe as it ran before the views cast on read: ``casts_weights_on_read`` patched to False, so
that the probe lends the whole block cast copies through ``torch.func.functional_call``. Every lend goes through
``torch.func.functional_call``, so a spy on it sees what each path copies.

Shape legend: ``N`` tokens, ``D`` model dim.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")

from helpers import assert_same_report  # noqa: E402

from moe_lightning.adapters import find_moe_layers  # noqa: E402
from moe_lightning.adapters.hf import HFSharedExpertView, HFSparseMoeView  # noqa: E402
from moe_lightning.adapters.hf_experts_views import ExpertsInterfaceView, SharedExpertView  # noqa: E402
from moe_lightning.adapters.hf_families import tiny_model  # noqa: E402
from moe_lightning.geometry import CastsOnRead, MoEView, ProbeConfig, probe  # noqa: E402

# family -> what its first MoE block has that a view reads besides the stacked expert weights
FAMILIES = {
    "mixtral": "a router module",
    "qwen2_moe": "a shared expert with a sigmoid gate",
    "qwen3_moe": "a router module",
    "deepseek_v3": "a router with a score-correction bias buffer, and shared experts",
    "minimax_m2": "block mode: the block's own forward routes, with a bias the block holds itself",
    "ergo": "a post-expert norm with one scale per expert, inside the experts module",
    "inkling2": "a router that casts its input to float32",
}
# the exact path, and the matrix-free one (closed-form and torch.func operators, the factored experts)
THRESHOLDS = {"exact": 1024, "matrix-free": 16}


@functools.cache
def _model(family: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family)


def block_views(family: str) -> tuple[nn.Module, list[MoEView], Tensor]:
    """The family's tiny model, the views of its first MoE block, and float32 tokens (N, D) for it."""
    model = _model(family)
    views = find_moe_layers(model)
    views = [v for v in views if v.module is views[0].module]
    d = model.config.get_text_config().hidden_size
    return model, views, torch.randn(24, d, generator=torch.Generator().manual_seed(0))


def stacked_expert_weights(block: nn.Module) -> list[Tensor]:
    """The stacked expert weights and biases of the block's experts-interface module (E of everything)."""
    experts = next(c for c in block.children() if hasattr(c, "down_proj") and c.down_proj.dim() == 3)
    names = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
    return [t for t in (getattr(experts, n, None) for n in names) if isinstance(t, Tensor)]


@contextmanager
def lent_tensors() -> Iterator[list[Tensor]]:
    """While open, every tensor that ``torch.func.functional_call`` is given a copy for (the probe's lend of a whole
    module and the views' lends for one call), as the module held it before the call."""
    lent: list[Tensor] = []
    call = torch.func.functional_call

    def spy(module: nn.Module, tensors: dict, *args, **kwargs):
        held = {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }
        lent.extend(held[name] for name in tensors)
        return call(module, tensors, *args, **kwargs)

    with mock.patch.object(torch.func, "functional_call", spy):
        yield lent


def lent_whole(view: MoEView):
    """The probe as before the views cast on read: it lends the whole block a cast copy."""
    return mock.patch.object(type(view), "casts_weights_on_read", lambda self: False, create=True)


def same_object(tensor: Tensor, among: list[Tensor]) -> bool:
    return any(tensor is t for t in among)


def check_cast_on_read(model: nn.Module, views: list[MoEView], x_ND: Tensor, cfg: ProbeConfig) -> None:
    """Each view's float64 probe lends no copy of the stacked expert weights, equals the probe that lends the whole
    block (which does copy them) on every report value to 1e-12, and no parameter or buffer changes."""
    before = {n: (t, t.dtype, t.data_ptr(), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    stacked = stacked_expert_weights(views[0].module)
    for view in views:
        with lent_tensors() as lent:
            report = probe(view, x_ND, cfg)
        assert not any(same_object(t, stacked) for t in lent), view.name
        assert isinstance(view, CastsOnRead) and view.casts_weights_on_read(), view
        with lent_whole(view), lent_tensors() as lent:
            reference = probe(view, x_ND, cfg)
        assert all(any(t is s for t in lent) for s in stacked), view.name  # the old path copies them: the spy sees it
        assert_same_report(report, reference, rel=1e-12, abs_=1e-14)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (tensor, dtype, pointer, values) in before.items():
        assert after[name] is tensor and tensor.dtype == dtype and tensor.data_ptr() == pointer, name
        assert torch.equal(tensor, values), name


#: The families whose float32 estimates are compared too (the products go through the views' operators whatever
#: the family): a plain routed block, and one with a shared expert.
FLOAT32_PRODUCTS = ("mixtral", "qwen2_moe")


# a view that gives no Jacobian factors warns that the matrix-free path reports no alignment: not what is tested here
@pytest.mark.filterwarnings("ignore:probe of .* no factors:RuntimeWarning")
@pytest.mark.parametrize("threshold", list(THRESHOLDS.values()), ids=list(THRESHOLDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float64_probe_of_a_float32_model_copies_no_expert_weights(family: str, threshold: int) -> None:
    model, views, x_ND = block_views(family)
    assert next(model.parameters()).dtype == torch.float32
    kinds = {type(v) for v in views}
    assert ExpertsInterfaceView in kinds and (SharedExpertView in kinds) == (len(views) > 1)
    # The lending probe's module holds float64 copies, so its estimates' products are float64: so are these.
    cfg = ProbeConfig(matrix_free_threshold=threshold, matrix_free_products_dtype=None)
    check_cast_on_read(model, views, x_ND, cfg)
    if threshold == THRESHOLDS["matrix-free"] and family in FLOAT32_PRODUCTS:
        # With the default float32 products on this float32 model no expert weight is copied either, and the
        # estimates move by far less than their standard errors (0.3 % of it at most here: these tiny blocks have
        # singular values below float32's resolution of the largest, docs/geometry.md §1).
        stacked = stacked_expert_weights(views[0].module)
        for view in views:
            double = probe(view, x_ND, cfg)
            with lent_tensors() as lent:
                single = probe(view, x_ND, ProbeConfig(matrix_free_threshold=threshold))
            assert not any(same_object(t, stacked) for t in lent), view.name
            for key in ("layer_jac_frobenius", "layer_jac_effective_rank"):
                shift = abs(single.layer[key] - double.layer[key])
                assert shift < 0.05 * double.layer[f"{key}_se"], (view.name, key)


def test_the_families_cover_every_kind_of_read() -> None:
    routed = {f: next(v for v in block_views(f)[1] if isinstance(v, ExpertsInterfaceView)) for f in FAMILIES}
    assert [f for f, v in routed.items() if v.mode == "block"] == ["minimax_m2"]
    block = routed["minimax_m2"].module
    assert any(t.is_floating_point() for t in [*block.parameters(recurse=False), *block.buffers(recurse=False)])
    assert any(n.endswith("e_score_correction_bias") for n, _ in routed["deepseek_v3"]._router[0].named_buffers())
    assert [f for f, v in routed.items() if v._router_in_float32] == ["inkling2"]
    assert next(routed["ergo"].experts.post_expert_norm.parameters()).dim() == 2  # one scale per expert
    gated = next(v for v in block_views("qwen2_moe")[1] if isinstance(v, SharedExpertView))
    assert gated._gate_name is not None


def test_float32_router_routes_as_the_model_on_float64_tokens() -> None:
    # Inkling2's router casts its input to float32: known when the view is built, so a traced call (the matrix-free
    # layer Jacobian's linearize) never runs a failing op; the routing is the model's float32 routing either way
    _, views, x_ND = block_views("inkling2")
    view = views[0]
    with torch.no_grad():
        own = view.gates(x_ND)
        assert own.dtype == torch.float32
        torch.testing.assert_close(view.gates(x_ND.double()), own.double(), rtol=0, atol=0)
        view._router_in_float32 = False  # found by the forward failing instead, as before
        try:
            torch.testing.assert_close(view.gates(x_ND.double()), own.double(), rtol=0, atol=0)
        finally:
            view._router_in_float32 = True


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_family_views_of_the_older_layout_cast_on_read_too(family: str) -> None:
    # the family adapters (kept for the transformers 4.x layout) read transformers 5 blocks as well
    model, views, x_ND = block_views(family)
    old: list[MoEView] = [HFSparseMoeView(views[0].name, views[0].module, always_normalise=family == "mixtral")]
    if family == "qwen2_moe":
        old.append(HFSharedExpertView(views[1].name, views[1].module))
    check_cast_on_read(model, old, x_ND, ProbeConfig())
