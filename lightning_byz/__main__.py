"""``python -m lightning_byz``: the same as the ``lightning-byz`` command."""

import sys

from lightning_byz.cli import main

sys.exit(main())
