"""LightningDataModules (the controlled synthetic task, WikiText language modelling), the training loader that a
resumed fit continues where it stopped, and the bundled text files."""

from moe_lightning.common.bundled import bundled_file, bundled_names
from moe_lightning.data.resumable import ResumableDataLoader, ResumableTrainData
from moe_lightning.data.synthetic import SyntheticMoEDataModule
from moe_lightning.data.wikitext import WikiTextDataModule

__all__ = [
    "ResumableDataLoader",
    "ResumableTrainData",
    "SyntheticMoEDataModule",
    "WikiTextDataModule",
    "bundled_file",
    "bundled_names",
]
