"""Choices that the model, the probe and the report share, in plain Python: the report reads a run's routing and
PCA sites without importing torch."""

from __future__ import annotations

#: Values of ``MoEConfig.routing``.
ROUTINGS = ("dense", "topk", "soft")
#: Where the probe can take a weighted PCA (docs/geometry.md §3): the layer input, the expert's hidden
#: activation and the expert's output.
PCA_SITES = ("input", "hidden", "output")
