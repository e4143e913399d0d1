"""How a monitor fails: never by stopping training. A failure on any rank becomes one warning that every rank agrees
on, at a point where every rank takes part, so that no rank is left waiting in a collective the failed rank skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def distributed(trainer: Trainer) -> bool:
    """Whether the trainer's ranks form a process group (a multi-process run)."""
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def sum_over_ranks(trainer: Trainer) -> Callable[[Tensor], Tensor] | None:
    """The sum of a tensor over the trainer's ranks (a collective), or None in a one-process run."""
    if not distributed(trainer):
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


class Failures:
    """One monitor's failures: agreed over ranks with :meth:`agree`, and warned about once per kind with
    :meth:`report`, on rank zero, naming the ranks that failed and their error."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._reported: set[tuple[str, tuple[str, ...]]] = set()

    def agree(self, trainer: Trainer, error: BaseException | None) -> dict[int, str]:
        """``{rank: repr(error)}`` of every rank whose part failed, the same on every rank.

        A collective under several ranks: every rank calls it at the same point, with its own error or None. The
        common case costs one all-reduce of one number; the errors are gathered only when one rank failed.
        """
        if not distributed(trainer):
            return {} if error is None else {0: repr(error)}
        flag = torch.tensor([float(error is not None)], device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum").item()) == 0:
            return {}
        messages: list[str | None] = [None] * trainer.world_size
        dist.all_gather_object(messages, None if error is None else repr(error))
        return {rank: message for rank, message in enumerate(messages) if message is not None}

    def run(self, trainer: Trainer, what: str, fn: Callable[[], object], consequence: str) -> bool:
        """``fn()`` on every rank (a monitor never stops training); True when it succeeded on every rank, else
        False, with the failure agreed and reported once. A collective: every rank calls it at the same point."""
        error = None
        try:
            fn()
        except Exception as caught:
            error = caught
        failures = self.agree(trainer, error)
        self.report(trainer, what, failures, consequence)
        return not failures

    def report(self, trainer: Trainer, what: str, failures: dict[int, str], consequence: str) -> None:
        """Warn once (rank zero) that ``what`` failed on the ranks of ``failures``, with each rank's error, and what
        follows from it; the same kind of failure (``what`` and the kinds of error) is not reported again."""
        if not failures:
            return
        key = (what, tuple(sorted({m.split("(", 1)[0] for m in failures.values()})))
        if key in self._reported:
            return
        self._reported.add(key)
        if trainer.world_size <= 1:
            detail = f": {next(iter(failures.values()))}"
        elif len(set(failures.values())) == 1:
            detail = f" on rank {', '.join(str(r) for r in failures)}: {next(iter(failures.values()))}"
        else:
            detail = " " + "; ".join(f"on rank {r}: {m}" for r, m in failures.items())
        rank_zero_warn(f"{self.owner}: {what} failed{detail}; {consequence}. Training goes on.")
