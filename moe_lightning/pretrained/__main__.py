"""``python -m moe_lightning.pretrained MODEL [options]``, the same as ``moe-lightning probe``."""

import sys

from moe_lightning.pretrained.command import main

sys.exit(main(sys.argv[1:]))
