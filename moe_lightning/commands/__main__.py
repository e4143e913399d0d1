"""``python -m moe_lightning.commands``: the ``moe-lightning`` command (what a sweep's jobs run)."""

import sys

from moe_lightning.commands import main

sys.exit(main())
