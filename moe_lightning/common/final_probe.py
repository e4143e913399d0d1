"""When the last values of a run no longer describe the model training ended with: the one rule that the monitors
(at the end of training) and the report (reading a run back) apply."""

from __future__ import annotations

#: The last probe is stale when more than this share of the run's steps came after it.
STALE_SHARE = 0.1


def stale_final_probe(last_probe: int | None, last_step: int) -> bool:
    """Whether the last probe of a run that trained until ``last_step`` lies far from its end.

    Far means more than :data:`STALE_SHARE` of the run's steps after it: a run of 128 steps probed last at step 0 or
    at step 100, or a run of 1000 steps probed last at step 600. A run that took no step cannot be stale; one that took
    steps and has no probe (``last_probe`` None) is.
    """
    if last_step <= 0:
        return False
    if last_probe is None:
        return True
    return last_step - last_probe > STALE_SHARE * last_step
