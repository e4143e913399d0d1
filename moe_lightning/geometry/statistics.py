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

__all__ = ["BufferLayout", "ProbeStatistics", "Slot"]


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

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Slot name -> view of the statistic in :attr:`buffer`, for inspection."""
        return {slot.name: slot.of(self.buffer) for slot in self.slots}

    def _with_buffer(self, buffer: Tensor) -> ProbeStatistics:
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
        if mine != [(s.name, s.shape) for s in other.slots]:
            raise ValueError(f"ProbeStatistics of {self.name!r}: cannot combine statistics with different layouts")

    def __add__(self, other: ProbeStatistics) -> ProbeStatistics:
        self._check_compatible(other)
        return self._with_buffer(self.buffer + other.buffer)

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

    def reduce(self, reduce_fn: Callable[[Tensor], Tensor]) -> ProbeStatistics:
        """Sum across ranks with exactly one ``reduce_fn`` call on a flat buffer of data-independent length."""
        return self.unflatten(reduce_fn(self.flatten()))
