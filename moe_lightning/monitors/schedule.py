"""When a monitor measures: once at fit start, every ``n`` steps of the training loop's step axis, every ``n`` training
epochs, and once at the end of training; never twice at one step (a resumed run keeps the steps it measured in its
checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_lightning.common.final_probe import STALE_SHARE, stale_final_probe
from moe_lightning.monitors.ranks import rank_zero_warn


@dataclass
class Schedule:
    """The measuring steps of one monitor.

    Attributes:
        every_n_steps: measure after a batch whose step is a multiple of this; None never.
        at_fit_start: measure once before the first training step (the initialisation baseline).
        every_n_epochs: measure at the end of every n-th training epoch; None never.
        at_fit_end: measure once when training ends (``on_train_end``: max_steps, max_epochs, early stopping), at
            its last step, unless that step was measured already; so a run's last values describe its last model.
        done: the steps measured so far, in order.
    """

    every_n_steps: int | None
    at_fit_start: bool = True
    every_n_epochs: int | None = None
    at_fit_end: bool = True
    done: list[int] = field(default_factory=list)

    def at_start(self, step: int) -> bool:
        return self.at_fit_start and step not in self.done

    def after_batch(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and step not in self.done

    def after_epoch(self, epochs_done: int, step: int) -> bool:
        return bool(self.every_n_epochs) and epochs_done % self.every_n_epochs == 0 and step not in self.done

    def at_end(self, step: int) -> bool:
        return self.at_fit_end and step not in self.done


def warn_if_stale(
    owner: str, last_values: dict[str, int | None], end: int, schedule: Schedule, what: str = "probe"
) -> None:
    """Warn (rank zero) when training ended at step ``end`` and the last values of an entry of ``last_values``
    (``name -> the step of its last logged values``, None for never) lie far from it
    (:func:`~moe_lightning.common.final_probe.stale_final_probe`): the run's final values then describe an earlier
    model. ``what`` names one measurement in the warning."""
    stale = {name: step for name, step in last_values.items() if stale_final_probe(step, end)}
    if not stale:
        return
    older = ", ".join(f"{name!r} (step {step})" for name, step in stale.items() if step is not None)
    never = ", ".join(repr(name) for name, step in stale.items() if step is None)
    found = [
        *(
            [f"the last values of {older} lie more than {STALE_SHARE:.0%} of the run's steps before it"]
            if older
            else []
        ),
        *([f"no values of {never} were logged at all"] if never else []),
    ]
    why = f"the {what} at step {end} logged nothing for them" if end in schedule.done else "at_fit_end=False"
    rank_zero_warn(
        f"{owner}: training ended at step {end}, but {'; '.join(found)} ({why}); the run's final values do not "
        "describe the trained model"
    )
