"""``python -m moe_lightning.commands.sweep``: the same as ``moe-lightning sweep``."""

import sys

from moe_lightning.commands.sweep.command import main

sys.exit(main())
