"""``Ranks.send``: values go to the logging function on rank zero only, and a logger that fails becomes one warning
instead of stopping training."""

import warnings

from moe_lightning.monitors import Ranks


def test_send_logs_on_rank_zero_only_and_a_failing_logger_warns_once():
    sent = []
    Ranks(rank=0, world_size=2).send(lambda values, step: sent.append((values, step)), {"a": 1.0}, 3, "Probe", set())
    Ranks(rank=1, world_size=2).send(lambda values, step: sent.append((values, step)), {"a": 2.0}, 3, "Probe", set())
    assert sent == [({"a": 1.0}, 3)]

    def broken(values, step):
        raise OSError("disk full")

    warned: set = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            Ranks().send(broken, {"a": 1.0}, 5, "Probe", warned)
    assert [str(w.message) for w in caught] == ["Probe: could not log at step 5: OSError('disk full')"]
