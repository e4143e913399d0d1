"""When a monitor measures: once at fit start, every ``n`` steps of Lightning's logging axis, every ``n`` training
epochs; never twice at one step (a resumed run keeps the steps it measured in its checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Schedule:
    """The measuring steps of one monitor.

    Attributes:
        every_n_steps: measure after a batch whose step is a multiple of this; None never.
        at_fit_start: measure once before the first training step (the initialisation baseline).
        every_n_epochs: measure at the end of every n-th training epoch; None never.
        done: the steps measured so far, in order.
    """

    every_n_steps: int | None
    at_fit_start: bool = True
    every_n_epochs: int | None = None
    done: list[int] = field(default_factory=list)

    def at_start(self, step: int) -> bool:
        return self.at_fit_start and step not in self.done

    def after_batch(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and step not in self.done

    def after_epoch(self, epochs_done: int, step: int) -> bool:
        return bool(self.every_n_epochs) and epochs_done % self.every_n_epochs == 0 and step not in self.done
