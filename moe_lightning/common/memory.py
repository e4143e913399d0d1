"""Freed memory given back to the operating system between the probe's steps.

glibc keeps what a process frees for its next allocations. A probe at real width allocates and frees tensors of
many sizes of a few MB to tens of MB (cast weights, Krylov bases, per-token cores); once glibc's adaptive mmap
threshold has risen past them they come from its heaps, where the holes between live blocks are kept, and the
resident set grows past what the probe holds (a Qwen3-30B-A3B-sized layer: a peak of 9.2 GiB against 4.0 GiB with
the pages handed back, docs/benchmarks/real-scale.md). ``malloc_trim(0)`` returns every free page of every heap.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

__all__ = ["release_freed_memory"]


def _load_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _load_trim()


def release_freed_memory() -> bool:
    """Return the C allocator's free pages to the operating system; whether it could (glibc only).

    It frees nothing that is live. It costs the release of the pages it returns (about 50 ms for 0.6 GB, 0.2 ms
    when there is nothing to return), and they are faulted in again when next used; the probe above
    ``matrix_free_threshold`` calls it after each accumulator's step.
    """
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
