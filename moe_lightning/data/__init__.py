"""LightningDataModules: the controlled synthetic task and WikiText language modelling."""

from moe_lightning.data.synthetic import SyntheticMoEDataModule
from moe_lightning.data.wikitext import WikiTextDataModule

__all__ = ["SyntheticMoEDataModule", "WikiTextDataModule"]
