"""``python -m moe_lightning``: the ``moe-lightning`` command."""

import sys

from moe_lightning.commands import main

sys.exit(main())
