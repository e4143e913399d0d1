"""moe-lightning: train Mixture-of-Experts models with PyTorch Lightning, with geometry probes built in."""

__version__ = "0.1.0"
