"""``python -m aanet``: the same as the ``aanet`` command."""

import sys

from aanet.cli import main

sys.exit(main())
