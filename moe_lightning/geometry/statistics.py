"""The probe's additive statistics as one flat buffer: named :class:`Slot` slices handed out by a
:class:`BufferLayout`, and :class:`ProbeStatistics`, which sums across ranks with one collective (docs/geometry.md
§3 for why sums make DDP exact)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_lightning.geometry.probe_config import ProbeConfig

if TYPE_CHECKING:  # the accumulators import this module
    from moe_lightning.geometry.accumulators.base import Accumulator
    from moe_lightning.geometry.accumulators.tokens import TokenCounts

__all__ = ["BufferLayout", "ProbeStatistics", "RowSlot", "Slot"]


@dataclass(frozen=True)
class Slot:
    """A named slice of the flat statistics buffer: ``shape`` entries from ``offset`` on.

    Attributes:
        name: a label for inspection (``ProbeStatistics.tensors``); the owner reaches its slot as an attribute.
        offset: first entry in the buffer.
        shape: shape of the statistic.
    """

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Entries of the slot."""
        return math.prod(self.shape)

    def of(self, buffer: Tensor) -> Tensor:
        """This slot's entries of ``buffer`` as a view of shape ``shape``: adding to it adds to the buffer."""
        return buffer[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class RowSlot:
    """Per-token records that are gathered, not summed: ``(n, width)`` rows, one per token (and expert), which chunks,
    shards and ranks combine by concatenation.

    What no fixed-length sum can hold exactly in bounded memory goes here: the weighted PCA of an expert that sees
    fewer tokens than its site is wide works from its tokens, not from ``D × D`` moments (docs/geometry.md §3). The
    slot's existence and width depend only on shapes and the config, so every rank gathers the same slots; only the
    number of rows depends on the data.

    Attributes:
        name: a label for inspection.
        width: entries per row.
    """

    name: str
    width: int

    def empty(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """No rows yet."""
        return torch.zeros(0, self.width, dtype=dtype, device=device)


class BufferLayout:
    """Hands out the slots of one flat buffer in allocation order.

    Every accumulator allocates from the shapes of the view and the config only, never from the data, so every
    rank builds the same layout and makes the same collective call.

    With ``replicates = B > 0`` a slot allocated with ``resampled=True`` also gets a *replica*, a ``(B, *shape)``
    slot holding the same sum with each token weighted by its count in each of ``B`` bootstrap resamples
    (docs/geometry.md, "Bootstrap over probe tokens"). :meth:`finish` places every replica after the last plain
    slot, so the plain statistics keep the offsets and values they have without a bootstrap, and one collective
    still sums everything.

    Args:
        replicates: B, bootstrap resamples; 0 allocates no replicas.
    """

    def __init__(self, replicates: int = 0) -> None:
        self.slots: list[Slot] = []
        self.size = 0
        self.replicates = replicates
        self._resampled: list[Slot] = []
        #: plain slot -> its replica, filled by :meth:`finish`.
        self.replicas: dict[Slot, Slot] = {}
        #: the gathered per-token records, in allocation order.
        self.row_slots: list[RowSlot] = []

    def allocate(self, name: str, *shape: int, resampled: bool = False) -> Slot:
        """A new slot of ``shape`` after the ones already handed out; ``resampled`` asks for a replica too."""
        if self.replicas:
            raise ValueError("BufferLayout.allocate: the layout is finished; allocate every slot before finish()")
        slot = Slot(name, self.size, tuple(shape))
        self.slots.append(slot)
        self.size += slot.numel
        if resampled and self.replicates:
            self._resampled.append(slot)
        return slot

    def allocate_rows(self, name: str, width: int) -> RowSlot:
        """A new :class:`RowSlot` of ``width`` entries per row, gathered across ranks beside the summed buffer."""
        slot = RowSlot(name, width)
        self.row_slots.append(slot)
        return slot

    def finish(self) -> None:
        """Allocate the replicas, after every plain slot (call once, after the last :meth:`allocate`)."""
        self.plain_size = self.size
        for slot in self._resampled:
            replica = Slot(f"bootstrap/{slot.name}", self.size, (self.replicates, *slot.shape))
            self.slots.append(replica)
            self.size += replica.numel
            self.replicas[slot] = replica

    def zeros(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer for every slot allocated so far, all zeros."""
        return torch.zeros(self.size, dtype=dtype, device=device)


@dataclass
class ProbeStatistics:
    """Additive sufficient statistics of one probe (see :mod:`moe_lightning.geometry.probe`).

    Attributes:
        name: the view's name.
        num_experts: E.
        dim: D.
        config: the :class:`ProbeConfig` used.
        tokens: the token-count accumulator (tokens, ``Σw``, ``Σw²`` per expert), which every quantity uses.
        quantities: the accumulators of the quantities probed, in report order; each owns its slots and the
            data-independent facts its finalisation needs.
        slots: every slot of the buffer, in buffer order.
        buffer: the statistics, one 1-D tensor whose length depends only on the view's shapes and ``config``.
        replicas: plain slot -> its bootstrap replica (empty without a bootstrap).
        rows: row slot -> its ``(n, width)`` per-token records, which shards and ranks concatenate (empty when no
            quantity keeps tokens).
    """

    name: str
    num_experts: int
    dim: int
    config: ProbeConfig
    tokens: TokenCounts
    quantities: Sequence[Accumulator]
    slots: Sequence[Slot]
    buffer: Tensor
    replicas: Mapping[Slot, Slot] = field(default_factory=dict)
    rows: Mapping[RowSlot, Tensor] = field(default_factory=dict)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Slot name -> view of the statistic in :attr:`buffer`, for inspection."""
        return {slot.name: slot.of(self.buffer) for slot in self.slots}

    def _with_buffer(self, buffer: Tensor, rows: Mapping[RowSlot, Tensor] | None = None) -> ProbeStatistics:
        return ProbeStatistics(
            self.name,
            self.num_experts,
            self.dim,
            self.config,
            self.tokens,
            self.quantities,
            self.slots,
            buffer,
            self.replicas,
            self.rows if rows is None else rows,
        )

    @property
    def plain_size(self) -> int:
        """Entries of the buffer before the first replica: the statistics without a bootstrap."""
        return min((r.offset for r in self.replicas.values()), default=self.buffer.numel())

    def replicate(self, b: int) -> Tensor:
        """The plain statistics of bootstrap resample ``b``: a copy of the plain part of the buffer with every
        resampled slot replaced by row ``b`` of its replica."""
        out = self.buffer[: self.plain_size].clone()
        for slot, replica in self.replicas.items():
            slot.of(out).copy_(replica.of(self.buffer)[b])
        return out

    def _check_compatible(self, other: ProbeStatistics) -> None:
        mine = [(s.name, s.shape) for s in self.slots]
        mine_rows = [(s.name, s.width) for s in self.rows]
        if mine != [(s.name, s.shape) for s in other.slots] or mine_rows != [(s.name, s.width) for s in other.rows]:
            raise ValueError(f"ProbeStatistics of {self.name!r}: cannot combine statistics with different layouts")

    def __add__(self, other: ProbeStatistics) -> ProbeStatistics:
        """The statistics of both token sets: the buffers summed, the per-token rows concatenated."""
        self._check_compatible(other)
        rows = {slot: torch.cat([mine, other.rows[slot]]) for slot, mine in self.rows.items()}
        return self._with_buffer(self.buffer + other.buffer, rows)

    def flatten(self) -> Tensor:
        """All statistics in one 1-D buffer (a copy, so an in-place all-reduce leaves these statistics alone)."""
        return self.buffer.clone()

    def unflatten(self, flat: Tensor) -> ProbeStatistics:
        """Inverse of :meth:`flatten` (same slots, new values)."""
        if flat.numel() != self.buffer.numel():
            raise ValueError(
                f"ProbeStatistics of {self.name!r}: expected {self.buffer.numel()} values, got {flat.numel()}"
            )
        return self._with_buffer(flat.reshape(-1).to(self.buffer.dtype))

    def reduce(
        self, reduce_fn: Callable[[Tensor], Tensor], gather_fn: Callable[[Tensor], Tensor] | None = None
    ) -> ProbeStatistics:
        """Sum across ranks with exactly one ``reduce_fn`` call on a flat buffer of data-independent length, and
        gather the per-token rows with one ``gather_fn`` call per row slot.

        Args:
            reduce_fn: sums a tensor across ranks and returns the sum.
            gather_fn: concatenates an ``(n, width)`` tensor across ranks, in rank order, where ``n`` may differ
                between ranks, and returns the ``(Σn, width)`` result. Required when :attr:`rows` has slots (which
                depends only on the shapes and the config, so every rank agrees): a sum would mix the ranks' tokens.
        """
        if self.rows and gather_fn is None:
            names = ", ".join(slot.name for slot in self.rows)
            raise ValueError(
                f"ProbeStatistics of {self.name!r}: these statistics keep per-token rows ({names}), which ranks "
                "combine by gathering: pass gather_fn to reduce (for instance Ranks.gather_rows)"
            )
        reduced = self.unflatten(reduce_fn(self.flatten()))
        if not self.rows:
            return reduced
        return reduced._with_buffer(reduced.buffer, {slot: gather_fn(t) for slot, t in self.rows.items()})
