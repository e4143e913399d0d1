"""The warning for state a monitor's forward passes changed and could not set back."""

from __future__ import annotations

from moe_lightning.common import warn_once
from moe_lightning.common.observe import StateChanges
from moe_lightning.monitors.ranks import rank_zero_warn


def warn_state_changes(owner: str, changes: StateChanges, store: set[str]) -> None:
    """Warn once when a monitor's forward passes changed state the model keeps outside its buffers that could not be
    set back (written in place): what was lost, and what was set back beside it. State that was set back whole
    (buffers, an attribute given a new value, as DeepSpeed's ``l_aux``) leaves training as it was: no warning."""
    lost = [c for c in changes if c not in changes.restored]
    if not lost:
        return
    message = (
        f"{owner}: the model's forward pass changes state it keeps outside its buffers: "
        + ", ".join(changes)
        + (f"; set back: {', '.join(changes.restored)}" if changes.restored else "")
        + (f"; written in place and not restored: {', '.join(lost)}" if lost else "")
        + ". Pass forward= (or loss_fn=) to run the model so that it keeps nothing (docs/callbacks.md, "
        "'What observation does not cover')"
    )
    warn_once(message, store, rank_zero_warn)
