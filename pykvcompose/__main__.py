"""``python -m pykvcompose``: the command line (``pykvcompose.cli``)."""

import sys

from .cli import main

sys.exit(main())
