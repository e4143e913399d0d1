"""LightningDataModules (the controlled synthetic task, WikiText language modelling) and the bundled text files."""

from moe_lightning.common.bundled import bundled_file, bundled_names
from moe_lightning.data.synthetic import SyntheticMoEDataModule
from moe_lightning.data.wikitext import WikiTextDataModule

__all__ = ["SyntheticMoEDataModule", "WikiTextDataModule", "bundled_file", "bundled_names"]
