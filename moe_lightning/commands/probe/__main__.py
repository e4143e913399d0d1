"""``python -m moe_lightning.commands.probe MODEL [options]``, the same as ``moe-lightning probe``."""

import sys

from moe_lightning.commands.probe.command import main

sys.exit(main(sys.argv[1:]))
