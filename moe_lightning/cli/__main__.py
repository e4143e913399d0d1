"""``python -m moe_lightning.cli``: the ``moe-lightning`` command (what a sweep's jobs run)."""

import sys

from moe_lightning.cli import main

sys.exit(main())
