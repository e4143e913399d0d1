"""The monitors' side of the view check (:func:`moe_lightning.adapters.verify.check_views`): each layer's views are
checked once, on the first probe's captured tokens, and a view that fails on any rank is dropped on every rank with
one warning, so that no value of it is ever logged and every rank takes the same collective path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.adapters.verify import check_views
from moe_lightning.geometry import MoEView
from moe_lightning.monitors.ranks import Failures, Ranks
from moe_lightning.monitors.sharded import gathered


class ViewRefused(Exception):
    """A view that failed its check; its text is the check's one-line message."""

    def __repr__(self) -> str:
        return str(self)


def _layer_gathered(view: MoEView, root: nn.Module):
    """The layer's FSDP2 shards whole on this rank while it is checked (a collective every rank enters for the same
    views); the check itself lends the experts that expert parallelism split, for the views' sum only."""
    return gathered(view.module, root=root)


def verified_views(
    ranks: Ranks,
    root: nn.Module,
    failures: Failures,
    views: Sequence[MoEView],
    captured: dict[str, Tensor],
    capture_error: BaseException | None,
    dtype: torch.dtype | None,
) -> list[MoEView] | None:
    """The views that pass their check (:func:`~moe_lightning.geometry.verify_view`, the views run in ``dtype``,
    None for the layer's own) on every rank; each one that fails is warned about once, naming the layer, the check
    and the size of the miss. None, with nothing checked,
    when the capture failed on some rank (the probe reports that; the check waits for the next probe). A
    collective: every rank calls it at the same point, with the same views. ``root`` is the whole model, whose
    FSDP2 group may hold a layer's weights."""
    if failures.agree(ranks, capture_error):
        return None
    checks, error = {}, None
    try:
        checks = check_views(views, captured, dtype, context=lambda view: _layer_gathered(view, root))
    except Exception as caught:  # check_views never raises but for a broken view list; agreed like a refusal
        error = caught
    kept = []
    for view in views:
        check = checks.get(view.name)
        mine = error if check is None else (None if check.passed else ViewRefused(check.message()))
        refused = failures.agree(ranks, mine)
        if refused:
            failures.report(ranks, f"the check of {view.name!r}", refused, f"no value of {view.name!r} is logged")
        else:
            kept.append(view)
    return kept


def drop_unverified_views(
    monitor: Any, ranks: Ranks, root: nn.Module, captured: dict[str, Tensor], error: BaseException | None
) -> None:
    """At a monitor's first probe (``monitor.views_checked`` false), keep only the ``monitor.views`` that pass their
    check (:func:`verified_views`, in the probe's dtype, ``monitor.probe_config.dtype``); a collective."""
    if monitor.views_checked:
        return
    dtype = monitor.probe_config.dtype
    checked = verified_views(ranks, root, monitor._failures, monitor.views, captured, error, dtype)
    if checked is not None:
        monitor.views, monitor.views_checked = checked, True
