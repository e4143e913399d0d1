"""The ranks a monitor runs on, and how it fails: never by stopping training. A failure on any rank becomes one warning
that every rank agrees on, at a point where every rank takes part, so that no rank is left waiting in a collective the
failed rank skipped. Pure ``torch.distributed``: whatever started the process group (Lightning, the Hugging Face
Trainer, Accelerate, ``torchrun``), the sums are the same."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_lightning.common import warn_once


def _process_rank() -> int:
    """This process's rank: the process group's, else the launcher's ``RANK`` (0 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def rank_zero_warn(message: str, stacklevel: int = 4) -> None:
    """:func:`warnings.warn` on rank zero only, so that a multi-process run warns once, not once per rank."""
    if _process_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)


@dataclass
class Ranks:
    """The ranks of a run, as a monitor sees them.

    Attributes:
        rank: this process's global rank.
        world_size: how many ranks train together.
        device: where a collective's tensors go (a CUDA device under NCCL); None: where they are.
        reduce: the sum of a tensor over the ranks, if the loop brings its own (Lightning's
            ``strategy.reduce``); None: ``torch.distributed.all_reduce``.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    reduce: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> Ranks:
        """The ranks of the default process group (one rank without one); ``device`` where collectives run, by
        default the current CUDA device under NCCL, else the CPU."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the ranks form a process group (a multi-process run)."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (a collective every rank enters), on :attr:`device`; itself alone."""
        if not self.distributed:
            return tensor
        tensor = tensor if self.device is None else tensor.to(self.device)
        if self.reduce is not None:
            return self.reduce(tensor)
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def send(self, log: Callable[[dict, int], Any] | None, values: dict, step: int, owner: str, warned: set) -> None:
        """``log(values, step)`` on rank zero; a logger that fails becomes one warning (once per message, kept in
        ``warned``) naming ``owner``, and training goes on."""
        if log is None or not self.is_global_zero or not values:
            return
        try:
            log(values, step)
        except Exception as error:  # a logger that fails must not stop training either
            warn_once(f"{owner}: could not log at step {step}: {error!r}", warned, rank_zero_warn)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """``(n, width)`` rows of every rank concatenated in rank order (a collective every rank enters), where ``n``
        may differ between ranks: the per-token statistics that a sum would mix (docs/geometry.md §3)."""
        if not self.distributed:
            return rows
        local = rows if self.device is None else rows.to(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device))
        counts = [int(size) for size in sizes]
        # all_gather needs one shape on every rank: pad to the longest, then cut each rank's rows out
        padded = torch.zeros(max(counts), *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(rows.device)

    def sum_fn(self) -> Callable[[Tensor], Tensor] | None:
        """:meth:`sum` for a multi-process run, None for one process (a statistic then needs no reduction)."""
        return self.sum if self.distributed else None


class Failures:
    """One monitor's failures: agreed over ranks with :meth:`agree`, and warned about once per kind with
    :meth:`report`, on rank zero, naming the ranks that failed and their error."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._reported: set[tuple[str, tuple[str, ...]]] = set()

    def agree(self, ranks: Ranks, error: BaseException | None) -> dict[int, str]:
        """``{rank: repr(error)}`` of every rank whose part failed, the same on every rank.

        A collective under several ranks: every rank calls it at the same point, with its own error or None. The
        common case costs one all-reduce of one number; the errors are gathered only when one rank failed.
        """
        if not ranks.distributed:
            return {} if error is None else {0: repr(error)}
        flag = torch.tensor([float(error is not None)], device=ranks.device)
        if float(ranks.sum(flag).item()) == 0:
            return {}
        messages: list[str | None] = [None] * ranks.world_size
        dist.all_gather_object(messages, None if error is None else repr(error))
        return {rank: message for rank, message in enumerate(messages) if message is not None}

    def run(self, ranks: Ranks, what: str, fn: Callable[[], object], consequence: str) -> bool:
        """``fn()`` on every rank (a monitor never stops training); True when it succeeded on every rank, else
        False, with the failure agreed and reported once. A collective: every rank calls it at the same point."""
        error = None
        try:
            fn()
        except Exception as caught:
            error = caught
        failures = self.agree(ranks, error)
        self.report(ranks, what, failures, consequence)
        return not failures

    def report(self, ranks: Ranks, what: str, failures: dict[int, str], consequence: str) -> None:
        """Warn once (rank zero) that ``what`` failed on the ranks of ``failures``, with each rank's error, and what
        follows from it; the same kind of failure (``what`` and the kinds of error) is not reported again."""
        if not failures:
            return
        key = (what, tuple(sorted({m.split("(", 1)[0] for m in failures.values()})))
        if key in self._reported:
            return
        self._reported.add(key)
        if ranks.world_size <= 1:
            detail = f": {next(iter(failures.values()))}"
        elif len(set(failures.values())) == 1:
            detail = f" on rank {', '.join(str(r) for r in failures)}: {next(iter(failures.values()))}"
        else:
            detail = " " + "; ".join(f"on rank {r}: {m}" for r, m in failures.items())
        rank_zero_warn(f"{self.owner}: {what} failed{detail}; {consequence}. Training goes on.")
