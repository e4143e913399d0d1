"""The MoEView protocol is strict: every member is required and checked when the probe is entered, and the two
optional members are protocols of their own."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.geometry import probe
from moe_lightning.geometry.view import VIEW_MEMBERS, HasJacobianOperator, HasPlacement, MoEView, check_view

D = 4


def full_view_class(without: str | None = None) -> type:
    """A view class with exactly the members in VIEW_MEMBERS, less ``without``."""
    members = {
        "name": "toy",
        "module": None,
        "num_experts": 2,
        "gates": lambda self, x: torch.softmax(x[:, :2], -1),
        "expert": lambda self, e: lambda x: torch.tanh(x * (e + 1)),
        "expert_hidden": lambda self, e: None,
        "expert_jacobian": lambda self, e, x: None,
    }
    assert set(members) == set(VIEW_MEMBERS)
    members.pop(without, None)
    return type("ToyView", (), members)


def test_view_members_are_the_protocols():
    # A view with all of VIEW_MEMBERS is an MoEView (the protocol asks for nothing else), and one without any of
    # them is not (the protocol asks for each).
    assert isinstance(full_view_class()(), MoEView)
    for member in VIEW_MEMBERS:
        assert not isinstance(full_view_class(without=member)(), MoEView), member


@pytest.mark.parametrize("member", VIEW_MEMBERS)
def test_probe_rejects_a_view_missing_a_member(member):
    view = full_view_class(without=member)()
    with pytest.raises(ValueError, match=rf"^probe: view ToyView lacks the MoEView member\(s\) {member};"):
        probe(view, torch.randn(8, D, dtype=torch.float64))


def test_check_view_names_every_missing_member_and_returns_a_view():
    view = full_view_class()()
    assert check_view(view, "caller") is view
    with pytest.raises(ValueError, match=r"^caller: view object lacks the MoEView member\(s\) name, module, "):
        check_view(object(), "caller")


def test_optional_members_are_protocols_of_their_own():
    plain = full_view_class()()
    with_operator = type("WithOperator", (full_view_class(),), {"expert_jacobian_operator": lambda s, e, x: None})()
    with_placement = type("WithPlacement", (full_view_class(),), {"placement": lambda s: None})()
    assert [isinstance(v, HasJacobianOperator) for v in (plain, with_operator, with_placement)] == [False, True, False]
    assert [isinstance(v, HasPlacement) for v in (plain, with_operator, with_placement)] == [False, False, True]
    # an optional member that is a plain None is not offered
    assert not isinstance(type("NoPlacement", (full_view_class(),), {"placement": None})(), HasPlacement)
