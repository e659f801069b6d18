"""``python -m kernforge`` runs the ``kernforge`` command."""

import sys

from .cli import main

sys.exit(main())
