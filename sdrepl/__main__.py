"""``python -m sdrepl`` is the same as the ``sdrepl`` console script."""

import sys

from sdrepl.cli import main

sys.exit(main())
