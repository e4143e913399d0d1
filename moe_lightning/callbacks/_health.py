"""What a probe of a layer cannot trust (weights or inputs that hold NaN/Inf): the monitors' core keeps it
(:mod:`moe_lightning.monitors.health`); the callbacks see it from here."""

from moe_lightning.monitors.health import LayerIncidents, NonFiniteWeights, finite_tensors, nonfinite_weights

__all__ = ["LayerIncidents", "NonFiniteWeights", "finite_tensors", "nonfinite_weights"]
