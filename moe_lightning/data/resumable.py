"""A DataLoader that a fit can resume in the middle of its shuffled order, drawing the batches an uninterrupted fit
would have drawn (:class:`ResumableDataLoader`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose place in its order travels in checkpoints.

    Why: a plain DataLoader started again after a resume shuffles as if training began anew, so the resumed fit
    trains on other batches than the interrupted one would have. The loader's ``state_dict`` goes into every
    checkpoint (Lightning's "resumable dataloader" interface, and :class:`ResumableTrainData` for a data module,
    which hands it back on resume in the cases where Lightning would not). The state is the loader's ``generator``
    state at the start of the current pass over the data and the number of batches handed out in that pass. A loader
    given that state restores the generator, so its next pass shuffles as the interrupted pass did, and skips the
    batches already trained on: they are read and dropped, cheap for the in-memory datasets of this package. Without
    a resume it is the plain DataLoader: the same seed gives the same batches. Lightning does not prefetch from a
    loader whose length it knows, so the batches handed out are the batches trained on when a checkpoint is saved.

    Only the data order is restored: a fit that draws other random numbers while training (dropout, router jitter)
    continues from the global RNG state of the resumed process, not of the interrupted one. Tested with
    ``num_workers=0``, the default of the data modules here.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(8))
        >>> loader = ResumableDataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> batches = iter(loader)
        >>> first = next(batches)
        >>> resumed = ResumableDataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> resumed.load_state_dict(loader.state_dict())
        >>> torch.equal(next(iter(resumed))[0], next(batches)[0])
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pass_start = None if self.generator is None else self.generator.get_state()
        self._served = 0  # batches handed out in the current pass
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            skip = int(self._resume["batches"])
            if self.generator is not None and self._resume["generator"] is not None:
                self.generator.set_state(self._resume["generator"])
            self._resume = None
        self._pass_start = None if self.generator is None else self.generator.get_state()
        self._served = 0
        iterator = super().__iter__()
        for _ in range(skip):  # the batches the interrupted fit trained on in this pass
            next(iterator)
            self._served += 1
        return self._counted(iterator)

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        # Pulls a batch only when the consumer asks for one, so the generator advances as in a plain pass.
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": the generator state at the start of the current pass (None without a generator),
        "batches": the batches handed out in it}``."""
        return {"generator": self._pass_start, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass the rest of the pass ``state_dict`` was saved in."""
        if set(state_dict) != {"generator", "batches"}:
            raise ValueError(
                "ResumableDataLoader.load_state_dict: expected the keys 'generator' and 'batches', "
                f"got {sorted(state_dict)}"
            )
        self._resume = dict(state_dict)


class ResumableTrainData:
    """Data-module mixin: the training loader's place in its order travels in the data module's own ``state_dict``.

    Why the data module and not only the loader: Lightning restores a loader's state only when it builds the loader
    after restoring the training loops, but a module whose optimiser asks for ``trainer.estimated_stepping_batches``
    (a cosine schedule does) makes Lightning build the loader before that, and the state would be dropped. A data
    module's state is restored before any loader is built: :meth:`resumable_train_loader` hands it to the loader.
    One process: under DDP Lightning builds a new loader around a distributed sampler, and a resumed fit starts the
    interrupted pass again, as a plain DataLoader would.
    """

    _train_loader: ResumableDataLoader | None = None
    _train_loader_state: dict[str, Any] | None = None

    def resumable_train_loader(self, loader: Any) -> Any:
        """``loader``, given the restored place when a fit resumes, and remembered for the next checkpoint (another
        kind of loader, e.g. the empty list of a data module without a training split, is returned as it is)."""
        if not isinstance(loader, ResumableDataLoader):
            return loader
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": the training loader's state}`` once a training loader was built, else ``{}``."""
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the training loader's state for the next training loader built."""
        self._train_loader_state = state_dict.get("train_loader")
