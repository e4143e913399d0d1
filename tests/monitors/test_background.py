"""ForkedCall, the child process a probe beside training runs in: its value, its exception and its warnings come
back to the parent; a child that dies or hangs is reported, never waited on forever; a snapshot is the parent's
memory at the fork."""

import os
import time
import warnings

import pytest
import torch

import moe_lightning.monitors.background as background
from moe_lightning.monitors.background import ChildLost, ForkedCall, fork_unavailable

pytestmark = pytest.mark.skipif(fork_unavailable() is not None, reason="forking needs Linux")


def test_the_child_computes_on_the_parents_memory_at_the_fork():
    weights = torch.arange(6.0).reshape(2, 3)
    job = ForkedCall(lambda: (weights @ weights.T, os.getpid(), torch.get_num_threads(), os.nice(0)))
    weights.mul_(100)  # the parent trains on: the child keeps the snapshot
    product, pid, threads, niceness = job.result()
    assert torch.equal(product, torch.tensor([[5.0, 14.0], [14.0, 50.0]]))
    assert pid != os.getpid() and threads == 1 and niceness == 19
    cpu, wall = job.times  # the child's own clocks, over fn()
    assert 0 <= cpu and 0 <= wall
    assert job.ready() and job.result()[1] == pid  # the outcome is kept


def test_an_exception_is_raised_in_the_parent_and_warnings_are_reemitted_once():
    def failing():
        warnings.warn("a note from the child", RuntimeWarning)
        raise ValueError("bad layer")

    warned: set[str] = set()
    with pytest.warns(RuntimeWarning, match="a note from the child"), pytest.raises(ValueError, match="bad layer"):
        ForkedCall(failing, warned=warned).result()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError):
        warnings.simplefilter("always")
        ForkedCall(failing, warned=warned).result()
    assert not caught  # the same message is not warned twice in one run


def test_an_exception_that_does_not_pickle_arrives_as_its_repr():
    class Local(Exception):  # a local class cannot be pickled
        pass

    def failing():
        raise Local("unpicklable")

    with pytest.raises(RuntimeError, match="Local\\('unpicklable'\\)"):
        ForkedCall(failing).result()


def test_a_child_that_dies_is_reported_with_how_it_ended():
    job = ForkedCall(lambda: os._exit(3))
    with pytest.raises(ChildLost, match="ended without a result \\(exit code 3\\)"):
        job.result()
    assert job.times is None
    with pytest.raises(ChildLost, match="killed by signal 9"):
        ForkedCall(lambda: os.kill(os.getpid(), 9)).result()


def test_a_hung_child_is_stopped(monkeypatch):
    monkeypatch.setattr(background, "STALL_S", 1.5)
    job = ForkedCall(lambda: time.sleep(60))  # a child blocked on a lock uses no CPU, as a sleeping one
    with pytest.raises(ChildLost, match="used no CPU for 2 s"):  # not the 60 s it would sleep
        job.result()
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)  # stopped and reaped


def test_cancel_stops_the_child():
    job = ForkedCall(lambda: time.sleep(60))
    job.cancel()
    with pytest.raises(ChildLost, match="cancelled"):
        job.result()
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)
