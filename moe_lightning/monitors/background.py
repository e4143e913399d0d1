"""Work beside training: a function run in a forked copy of this process, at the lowest CPU priority, whose result
comes back through a pipe while the parent trains on (docs/callbacks.md, "Probing beside training").

A fork starts the child with the parent's memory as it is at that instant: the model's weights at the step being
probed and the layer inputs just captured, with nothing copied or pickled (any adapter's view works as it does in
the parent), and the parent returns to training at once. Pages the parent writes afterwards are copied for it by the
kernel, so the child keeps seeing the snapshot. The child runs one torch thread at niceness 19, so that it takes the
CPU time training leaves idle rather than a core from one of training's threads: those wait for each other, and a
child at the parent's priority slowed the training steps 2.7x on the 2-core CPU (docs/benchmarks/callbacks.md).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import warnings
from collections.abc import Callable
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import torch

#: A child whose CPU time has not moved for this long while the parent waits for it is taken for hung and stopped.
STALL_S = 120.0

_PENDING = object()


def fork_unavailable() -> str | None:
    """Why this process cannot run work in a forked child (the platform), or None when it can."""
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return f"it forks the process, which is supported on Linux only (this is {sys.platform})"
    return None


class ChildLost(RuntimeError):
    """The child ended, or hung, without sending its result."""


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RuntimeError`` carrying its ``repr``."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(repr(error))


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of process ``pid`` (Linux ``/proc``), or None when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _run_child(fn: Callable[[], Any], writer: Any, threads: int, nice: int) -> None:
    """The child's whole life: ``fn()`` with its warnings recorded, the outcome pickled into ``writer``, then
    ``os._exit`` (no exit handler of the parent's, no flush of its buffers, no logger, runs twice)."""
    code = 1
    try:
        os.nice(nice)
        torch.set_num_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome: tuple[str, Any] = ("value", fn())
            except Exception as error:
                outcome = ("error", portable(error))
        notes = [(str(w.message), w.category) for w in caught]
        times = (time.process_time() - cpu, time.perf_counter() - wall)
        writer.send_bytes(pickle.dumps((*outcome, notes, times), protocol=pickle.HIGHEST_PROTOCOL))
        code = 0
    except BaseException:  # noqa: S110 - the parent reports a child that sent nothing (ChildLost)
        pass
    finally:
        os._exit(code)


class ForkedCall:
    """``fn()`` in a forked child, started at construction; :meth:`result` waits for its value.

    The child runs ``threads`` torch threads, ``nice`` steps of niceness below the parent's priority. Its warnings
    are re-emitted in the parent by :meth:`result`, each distinct message once per ``warned`` set. Its exception is
    re-raised by :meth:`result`; a child that dies, or whose CPU time stands still for :data:`STALL_S` seconds while
    the parent waits (a lock held at the fork by another thread of the parent), raises :class:`ChildLost`.

    Args:
        fn: what the child computes; its value must pickle.
        threads: the child's ``torch.set_num_threads``.
        nice: how much lower than the parent's the child's CPU priority is (19, the default: the lowest).
        warned: the messages already re-emitted (shared between calls to warn once per run).
    """

    def __init__(self, fn: Callable[[], Any], threads: int = 1, warned: set[str] | None = None, nice: int = 19) -> None:
        reader, writer = Pipe(duplex=False)
        with warnings.catch_warnings():
            # Python 3.12 warns on forking a process with threads; the child uses none of the parent's threads' locks
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected; the parent checks its outcome
            reader.close()
            _run_child(fn, writer, threads, nice)
        writer.close()
        self.pid, self._reader, self._outcome = pid, reader, _PENDING
        self._warned = set() if warned is None else warned
        #: ``(CPU seconds, wall seconds)`` of ``fn()`` in the child, once :meth:`result` has its outcome (None for a
        #: lost child): their ratio is the share of a core the child had.
        self.times: tuple[float, float] | None = None

    def ready(self) -> bool:
        """Whether :meth:`result` would return (or raise) without waiting."""
        return self._outcome is not _PENDING or self._reader.poll()

    def result(self) -> Any:
        """The child's value, waiting for it; its exception re-raised, or :class:`ChildLost`."""
        if self._outcome is _PENDING:
            self._outcome = self._receive()
        kind, value, notes, self.times = self._outcome
        for message, category in notes:
            if message not in self._warned:
                self._warned.add(message)
                warnings.warn(message, category, stacklevel=2)
        if kind == "lost" or kind == "error":
            raise value
        return value

    def _receive(self) -> tuple[str, Any, list, tuple[float, float] | None]:
        cpu, still_since = process_cpu_seconds(self.pid), time.monotonic()
        try:
            while not self._reader.poll(1.0):
                now, seen = time.monotonic(), process_cpu_seconds(self.pid)
                if seen != cpu:
                    cpu, still_since = seen, now
                elif now - still_since > STALL_S:
                    self._stop()
                    lost = ChildLost(f"its process (pid {self.pid}) used no CPU for {STALL_S:.0f} s")
                    return "lost", lost, [], None
            payload = self._reader.recv_bytes()
        except EOFError:
            return "lost", ChildLost(f"its process ended without a result ({self._reap()})"), [], None
        finally:
            self._reader.close()
        self._reap()
        return pickle.loads(payload)

    def _reap(self) -> str:
        """Wait for the child's exit; how it ended, in words."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit code {os.waitstatus_to_exitcode(status)}"

    def _stop(self) -> None:
        """Kill the child, reap it and close the pipe."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap()
        self._reader.close()

    def cancel(self) -> None:
        """Stop the child, if it still runs, without its result."""
        if self._outcome is _PENDING:
            self._stop()
            self._outcome = ("lost", ChildLost("cancelled"), [], None)
