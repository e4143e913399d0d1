"""The values the report's options accept, kept apart from the report stack so that ``moe-lightning report`` parses
its arguments (and prints its help) without loading pandas, matplotlib or torch."""

# How a seed's value is read from a multi-layer model: averaged over layers, or one row per layer.
LAYER_MODES = ("mean", "each")
# What build_report writes.
FORMATS = ("md", "csv", "png", "html")
