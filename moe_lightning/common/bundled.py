"""Text files shipped inside the package (WikiText-2's validation and test splits), found by name.

The files live in the package, not next to a checkout, so a clone in any folder and an installed wheel find
them alike. A config names one as ``bundled:<name>``, for example ``bundled:wikitext-2/valid.txt``; their source
and licence are in ``moe_lightning/data/wikitext-2/README.md``. They are found from the top package, so that
looking one up does not import ``moe_lightning.data`` (and with it Lightning and ``datasets``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"
WIKITEXT2_TRAIN = "wikitext-2/valid.txt"
"""The bundled split the WikiText configs train on (WikiText-2's validation split)."""
WIKITEXT2_VAL = "wikitext-2/test.txt"
"""The bundled split the WikiText configs validate on, and the default text of ``moe-lightning probe``."""


def _data_root():
    return resources.files("moe_lightning").joinpath("data")


def bundled_names() -> list[str]:
    """Names of every bundled text file, such as ``"wikitext-2/valid.txt"``."""
    root = _data_root()
    return sorted(
        f"{folder.name}/{item.name}"
        for folder in root.iterdir()
        if folder.is_dir() and not folder.name.startswith(("_", "."))
        for item in folder.iterdir()
        if item.name.endswith(".txt")
    )


def bundled_file(name: str) -> Path:
    """Path of the bundled text file ``name`` (with or without the ``bundled:`` prefix).

    Raises:
        ValueError: ``name`` is not a bundled file; the message lists those that are.
    """
    name = name.removeprefix(BUNDLED_PREFIX)
    if name not in bundled_names():
        raise ValueError(f"{name!r} is not a bundled file; bundled files: {', '.join(bundled_names())}")
    # A regular (unzipped) install: files() is a real directory, so its path stays valid after this call.
    return Path(str(_data_root().joinpath(name)))


def resolve_text_file(path: str | os.PathLike | None) -> str | None:
    """``path`` as a string, or the real path of a ``bundled:<name>`` file; ``None`` stays ``None``."""
    if path is None:
        return None
    path = os.fspath(path)
    return str(bundled_file(path)) if path.startswith(BUNDLED_PREFIX) else path


def is_bundled(path: str | Path) -> bool:
    """Whether ``path`` (already resolved) is one of the files shipped in the package."""
    data_root = Path(str(_data_root())).resolve()
    return Path(path).resolve().is_relative_to(data_root)
