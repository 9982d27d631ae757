"""``python -m mor.cli``: the ``mor`` command without its console script."""

import sys

from mor.cli import main

sys.exit(main())
