import sys

from moe_lightning.cli import main

sys.exit(main())
