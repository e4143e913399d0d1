"""A resumed training loader hands out the batches an uninterrupted one would: its order is torch's own shuffled
DataLoader's, and a state saved anywhere in any pass gives the rest of that pass and the passes after it. And the
CSV history of a resumed run drops the rows logged after its checkpoint."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.data.resumable import ResumableDataLoader
from moe_lightning.lightning.loggers import CSVHistoryMark

DATA = TensorDataset(torch.arange(10))
PASSES = 3


def _loader(cls=ResumableDataLoader):
    # batch 3 of 10 samples: the last batch of a pass is short, as in a real epoch
    return cls(DATA, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))


def _batches(loader, passes: int = PASSES) -> list[list[int]]:
    return [batch[0].tolist() for _ in range(passes) for batch in loader]


def test_the_order_is_the_plain_dataloaders():
    reference = _batches(_loader(DataLoader))
    assert _batches(_loader()) == reference
    assert len({tuple(b) for b in reference}) > 4  # shuffled differently in each pass


@pytest.mark.parametrize("pass_index", range(PASSES))
@pytest.mark.parametrize("served", [0, 1, 3, 4])  # 4: the whole pass, as a checkpoint at the end of an epoch
def test_a_state_saved_anywhere_resumes_the_same_batches(pass_index, served):
    reference = _batches(_loader(DataLoader), PASSES + 1)
    interrupted = _loader()
    seen = [batch[0].tolist() for _ in range(pass_index) for batch in interrupted]
    batches = iter(interrupted)
    seen += [next(batches)[0].tolist() for _ in range(served)]
    resumed = _loader()
    resumed.load_state_dict(interrupted.state_dict())
    # The rest of the interrupted pass, then whole passes.
    rest = [batch[0].tolist() for batch in resumed] + _batches(resumed, PASSES - pass_index)
    assert seen + rest == reference


def test_the_data_module_carries_the_place_across_a_resume():
    def module():
        return SyntheticMoEDataModule(num_train=96, num_val=16, num_test=16, batch_size=32, seed=3)

    plain = module().train_dataloader()
    reference = [x for _ in range(2) for x, _ in plain]
    interrupted = module()
    loader = interrupted.train_dataloader()
    seen = list(loader)  # one pass
    batches = iter(loader)
    seen.append(next(batches))
    resumed = module()
    resumed.load_state_dict(interrupted.state_dict())
    seen += list(resumed.train_dataloader())
    assert len(seen) == len(reference) == 6
    assert all(torch.equal(x, y) for (x, _), y in zip(seen, reference, strict=True))


def test_a_foreign_state_is_refused():
    with pytest.raises(ValueError, match="expected the keys 'generator' and 'batches'"):
        _loader().load_state_dict({"epoch": 1})


def test_the_csv_history_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    class Trainer:
        global_step = 4

    logger = CSVLogger(tmp_path, name="", version="")
    mark = CSVHistoryMark([logger])
    mark.setup(Trainer(), None, "fit")
    for step in range(4):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.log_metrics({"probe": 1.0}, step=4)  # logged before the checkpoint at step 4: kept
    state = mark.state_dict()
    assert state == {"rows": [5], "step": 4}
    logger.log_metrics({"train/loss": 3.5}, step=3)  # the step that triggered the checkpoint, logged after it: kept
    logger.log_metrics({"train/loss": 4.0, "val": 1.0}, step=4)  # logged again by the resumed fit: dropped
    logger.log_metrics({"train/loss": 5.0}, step=5)
    logger.save()
    CSVHistoryMark([CSVLogger(tmp_path, name="", version="")]).load_state_dict(state)
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["step"], row["train/loss"], row["probe"]) for row in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "3.0", ""),
        ("4", "", "1.0"),
        ("3", "3.5", ""),
    ]
