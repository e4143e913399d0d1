"""The check of ``--ckpt_path`` before anything of a run is created: a missing, truncated or foreign file fails in
one line naming it, instead of a raw ``OSError`` from ``torch.load`` after the logger has made its run folder.

The file is read without unpickling it: ``torch.save`` writes a zip archive whose ``data.pkl`` holds the pickled
mapping, and a Lightning checkpoint's mapping has the key ``pytorch-lightning_version``; the opcodes of that pickle
are scanned for it (``pickletools``), so no code of the file runs and no tensor is read.
"""

from __future__ import annotations

import os
import pickletools
import zipfile

#: ``ckpt_path`` values that Lightning resolves itself (``Trainer.fit(ckpt_path=...)``), never paths.
SPECIAL_VALUES = ("last", "best", "hpc", "registry")
#: The key every Lightning checkpoint holds (``lightning.pytorch.trainer.connectors.checkpoint_connector``).
LIGHTNING_KEY = "pytorch-lightning_version"
#: The file that marks a folder as a ``torch.distributed.checkpoint`` (how ``ModelParallelStrategy`` saves).
DISTRIBUTED_METADATA = ".metadata"


class CheckpointError(ValueError):
    """``--ckpt_path`` names nothing that Lightning can resume from; the message names the file and the fault."""


def _is_special(path: str) -> bool:
    return path in SPECIAL_VALUES or path.startswith("registry:") or "://" in path


def _pickle_strings(data: bytes) -> set[str]:
    """Every string constant of a pickle, read from its opcodes without running it."""
    strings = set()
    for opcode, argument, _ in pickletools.genops(data):
        if isinstance(argument, str) and "UNICODE" in opcode.name:
            strings.add(argument)
    return strings


def check_checkpoint(path: str | os.PathLike | None) -> None:
    """Fail with a :class:`CheckpointError` unless ``path`` is a checkpoint that Lightning can load.

    Accepted: None, Lightning's special values (``last``, ``best``, ``hpc``, ``registry[:...]``), remote URLs (left
    to fsspec), a ``torch.distributed.checkpoint`` folder (with ``.metadata``), and a ``torch.save`` zip archive
    whose pickle holds ``pytorch-lightning_version``.

    Raises:
        CheckpointError: the path does not exist, is a folder that is not a distributed checkpoint, is empty, is not
            a ``torch.save`` archive (truncated or another format), or holds no Lightning checkpoint.
    """
    if path is None:
        return
    name = os.fspath(path)
    if _is_special(name):
        return
    shown = f"checkpoint {name!r}"
    if not os.path.exists(name):
        raise CheckpointError(f"{shown} does not exist; give a .ckpt file or one of {', '.join(SPECIAL_VALUES)}")
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, DISTRIBUTED_METADATA)):
            return
        raise CheckpointError(
            f"{shown} is a folder without {DISTRIBUTED_METADATA}: neither a .ckpt file nor a distributed checkpoint"
        )
    if os.path.getsize(name) == 0:
        raise CheckpointError(f"{shown} is empty (0 bytes)")
    try:
        with zipfile.ZipFile(name) as archive:
            pickles = [member for member in archive.namelist() if member.endswith("/data.pkl")]
            data = archive.read(pickles[0]) if pickles else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(
            f"{shown} is unreadable: not a torch.save archive (truncated, corrupted or another format: {error})"
        ) from None
    if data is None:
        raise CheckpointError(f"{shown} is a zip archive without data.pkl, not a torch.save checkpoint")
    try:
        strings = _pickle_strings(data)
    except ValueError as error:  # pickletools' word for a corrupt opcode stream
        raise CheckpointError(f"{shown} is unreadable: its data.pkl is corrupted ({error})") from None
    if LIGHTNING_KEY not in strings:
        raise CheckpointError(
            f"{shown} is not a Lightning checkpoint: it has no {LIGHTNING_KEY!r} (a torch.save of something else, "
            "e.g. a bare state_dict)"
        )
